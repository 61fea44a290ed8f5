"""Where a training run and a sweep keep their files, and reading them back: standard library
only, so launch/ (on machines without JAX) and the analysis read them through one module.

  WORKDIR/                     python -m yuanjax.train --workdir=WORKDIR
    checkpoints/<step>/        Orbax checkpoints (yuanjax.checkpoint writes and restores them)
    metrics.jsonl              one JSON object per logged step (yuanjax.metrics.MetricsWriter)
    tb/                        TensorBoard event files (the same writer)
    logs/process_<i>.log       each process's output, for a run launch.sweep starts locally
  SWEEP/                       python -m launch.sweep --workdir=SWEEP
    sweep.json                 the manifest (launch.sweep writes it, yuanjax.report reads it)
    <variant>/                 one WORKDIR per variant

Config files (configs/*.py; not a package) load by path, as ml_collections' config_flags loads
`--config=FILE[:ARG]`: `load_config(*split_config_spec('configs/x.py:smoke'))`.

Paths may be gs://BUCKET/PATH where the trainer writes there: checkpoint steps are then listed
through etils.epath (Orbax's path library), imported only for such a path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import types

CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tb'
LOGS = 'logs'
SWEEP_MANIFEST = 'sweep.json'

# ------------------------------------------------------------------------------- layout


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD)


def logs_dir(workdir: str) -> str:
  return os.path.join(workdir, LOGS)


def sweep_manifest_path(sweep_dir: str) -> str:
  return os.path.join(sweep_dir, SWEEP_MANIFEST)


def variant_dir(sweep_dir: str, name: str) -> str:
  """The workdir of the sweep's variant `name`."""
  return os.path.join(sweep_dir, name)


# -------------------------------------------------------------------------------- reading


def _names(directory: str) -> list[str]:
  """The entries of a local or gs:// directory; [] if there is none."""
  if '://' in directory:
    from etils import epath  # pylint: disable=g-import-not-at-top  (remote paths only)
    path = epath.Path(directory)
    return [p.name for p in path.iterdir()] if path.exists() else []
  return os.listdir(directory) if os.path.isdir(directory) else []


def steps_in(directory: str) -> list[int]:
  """The steps of the finished checkpoints in a checkpoints directory, oldest first: its
  <step> subdirectories, not Orbax's temporary ones nor those moved aside (`<step>.*`)."""
  return sorted(int(n) for n in _names(directory) if n.isdigit())


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints a training workdir holds, oldest first ([] if
  none)."""
  return steps_in(checkpoints_dir(workdir))


def read_metrics(workdir: str, missing_ok: bool = False) -> dict[str, list[dict]]:
  """WORKDIR/metrics.jsonl grouped by kind ({'train': [...], 'eval': [...]}), each in step
  order. No file: {} with missing_ok, else FileNotFoundError naming it."""
  path = metrics_path(workdir)
  if missing_ok and not os.path.exists(path):
    return {}
  out: dict[str, list[dict]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        out.setdefault(record.get('kind', 'train'), []).append(record)
  return {k: sorted(v, key=lambda r: r['step']) for k, v in out.items()}


def read_sweep_manifest(sweep_dir: str) -> dict | None:
  """SWEEP/sweep.json, or None if there is none."""
  path = sweep_manifest_path(sweep_dir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------- config files


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:smoke' -> ('configs/x.py', 'smoke'); 'configs/x.py' -> ('configs/x.py',
  None)."""
  path, colon, arg = spec.partition(':')
  return path, arg if colon else None


def load_config_module(path: str) -> types.ModuleType:
  """Imports the config file at `path` (a fresh module each call; errors are the file's)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such config file')
  name = '_yuanjax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str, arg: str | None = None):
  """The config file's get_config(arg), or get_config() without an arg: what the trainer's
  --config=FILE[:ARG] gives."""
  module = load_config_module(path)
  return module.get_config() if arg is None else module.get_config(arg)
