"""Orbax checkpoints: train state and grain iterator state saved together, async.

This module owns what is inside a checkpoint: WORKDIR/checkpoints/<step>/{state,data,meta}
(`for_workdir(workdir)` for the trainer, `restore_params(workdir, ...)` for yuanjax.loader;
relative workdirs are made absolute here, as Orbax requires); yuanjax.workdir owns where the
checkpoints directory is and which steps it holds. Orbax writes each save into a
temporary directory and renames it when complete, so a save cut short (SIGKILL mid-save)
never looks like a checkpoint. A checkpoint that looks complete but cannot be read (a file
truncated or removed) is reported, moved aside to `<step>.unreadable-<n>` (never deleted),
and the previous good one is used.

Several processes: every process calls save and restore (Orbax coordinates them: each writes
and reads the shards of its own devices, process 0 writes the metadata and finalises).
grain's handler writes one iterator state per process, `data/process_<i>-of-<n>.json`; a
checkpoint written by a different number of processes is refused with an error (its data
states do not fit), not moved aside. Falling back from an unreadable checkpoint is agreed by
all processes: after each attempt they all-gather whether it failed; if any did, process 0
alone moves the step aside, all wait at a barrier, and all try the previous step. (A read
that fails on some processes only can leave the others waiting in Orbax's own end-of-restore
barrier, which the vote cannot reach; the run then stops with an error, or, failing that, the
launcher's or the coordination service's timeout ends it. Move the step aside by hand.)

It also owns every other Orbax read and write: a params tree in a plain PyTree directory
(`restore_tree`, `stored_tree`; a workdir checkpoint's state/ and a converted dir's params/,
yuanjax.interop.converted) and such a directory written in parts (`save_part`,
`finish_parts`: orbax's partial saving, one part at a time to bound host memory).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from yuanjax import workdir as workdir_lib


class _Everything(set):

  def __contains__(self, item):
    return True


_EVERYTHING = _Everything()


class SaveError(RuntimeError):
  """A checkpoint could not be written; the ones already saved are intact."""


def directory(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (Orbax refuses relative paths)."""
  path = workdir_lib.checkpoints_dir(workdir)
  return path if '://' in path else os.path.abspath(path)


def has_checkpoints(workdir: str) -> bool:
  return os.path.isdir(directory(workdir))


def for_workdir(workdir: str, *, keep: int, async_save: bool = True) -> 'Checkpointer':
  return Checkpointer(directory(workdir), keep=keep, async_save=async_save)


def read_meta(workdir: str, step: int) -> dict:
  with ocp.CheckpointManager(directory(workdir)) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_params(workdir: str, make_abstract, step: int | None = None):
  """(step, params, meta) of the newest readable checkpoint of a training workdir, read-only:
  an unreadable one is reported and the previous one tried (nothing is moved). With `step`,
  that checkpoint alone. `make_abstract(meta)` gives the abstract params (ShapeDtypeStructs;
  with shardings, the params come back as jax.Arrays sharded so, in their dtypes; without, as
  NumPy arrays in their stored dtypes: `restore_tree`)."""
  found = workdir_lib.checkpoint_steps(workdir)
  if not found:
    raise FileNotFoundError(f'{workdir}: no checkpoints under {directory(workdir)}')
  if step is not None:
    if step not in found:
      raise FileNotFoundError(f'{workdir}: no checkpoint of step {step} (there are {found})')
    found = [step]
  for step in reversed(found):
    try:
      meta = read_meta(workdir, step)
      state_dir = os.path.join(directory(workdir), str(step), 'state')
      state = restore_tree(state_dir, {'params': make_abstract(meta)}, cast=False)
      return step, state['params'], meta
    except Exception as e:  # noqa: BLE001 - any read failure means: use an older one
      logging.error('checkpoint %s/%d is unreadable (%s: %s); trying the previous one',
                    directory(workdir), step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else '')
  raise FileNotFoundError(f'{workdir}: no readable checkpoint among steps {found}')


# ---------------------------------------------------------------- PyTree directories

_STANDARD_HANDLER = 'orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler'


def _sharded(item) -> bool:
  leaves = jax.tree.leaves(item)
  return bool(leaves) and all(getattr(a, 'sharding', None) is not None for a in leaves)


def restore_tree(tree_dir: str, item, *, cast: bool = True):
  """The sub-tree `item` (ShapeDtypeStructs) of the PyTree directory tree_dir: jax.Arrays
  sharded as item's leaves are (in item's dtypes) when they all carry a sharding, else NumPy
  arrays in item's dtypes (cast) or in their stored dtypes (not cast)."""
  if _sharded(item):
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  else:
    restore_args = jax.tree.map(
        lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype if cast else None), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(
        tree_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))


def stored_tree(tree_dir: str):
  """The tree of the leaves' metadata (shape, dtype) a PyTree directory holds."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.metadata(tree_dir).item_metadata.tree


def _save_context(chunk_bytes: int, compress: bool):
  """How each part is written: no defensive copy of the leaves (the caller does not mutate
  them while they are written); chunks of at most `chunk_bytes` split along the first axis
  (experts for w1/w2), so a sharded restore reads only what it needs and the writer holds one
  chunk beyond the part's leaf (tensorstore copies a leaf into its chunks once while
  writing); no zstd unless asked (it also buffers the compressed leaf, and is ~5x slower)."""
  import orbax.checkpoint.experimental.v1 as ocpv1  # pylint: disable=g-import-not-at-top
  storage = ocpv1.options.ArrayOptions.Saving.StorageOptions(chunk_byte_size=chunk_bytes,
                                                             shard_axes=(0,))
  return ocpv1.Context(
      memory_options=ocpv1.options.MemoryOptions(deepcopy_host_arrays=False),
      array_options=ocpv1.options.ArrayOptions(saving=ocpv1.options.ArrayOptions.Saving(
          storage_options=storage, use_compression=compress)))


def save_part(partial_dir: str, tree, *, chunk_bytes: int, compress: bool = False) -> None:
  """Adds `tree`'s leaves (NumPy arrays) to the partial save in partial_dir (few large parts:
  orbax's finalize merges each one)."""
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  with _save_context(chunk_bytes, compress):
    partial.save(partial_dir, tree)


def finish_parts(partial_dir: str, tree_dir: str) -> None:
  """Finalizes the partial save and moves its PyTree directory to tree_dir (a plain
  StandardCheckpointer layout); partial_dir is removed."""
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  partial.finalize(partial_dir)
  trees = [
      d for d in os.listdir(partial_dir)
      if os.path.isfile(os.path.join(partial_dir, d, '_METADATA'))
  ]
  if len(trees) != 1:
    raise AssertionError(
        f'unexpected orbax partial-save layout in {partial_dir}: {os.listdir(partial_dir)}')
  os.rename(os.path.join(partial_dir, trees[0]), tree_dir)
  now = time.time_ns()
  with open(os.path.join(tree_dir, '_CHECKPOINT_METADATA'), 'w') as f:
    json.dump(
        {
            'item_handlers': _STANDARD_HANDLER,
            'metrics': {},
            'performance_metrics': {},
            'init_timestamp_nsecs': now,
            'commit_timestamp_nsecs': now,
            'custom_metadata': {}
        }, f, indent=2, sort_keys=True)
    f.write('\n')
  shutil.rmtree(partial_dir)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    self._keep, self._async = keep, async_save
    self._open()

  def _open(self):
    self.mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                             enable_async_checkpointing=self._async))

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    """Starts saving `step` (async); a failure of this or an earlier save is a SaveError."""
    with self._reporting(step):
      self.mngr.save(
          step, force=True, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=grain.checkpoint.CheckpointSave(data_iterator), meta=ocp.args.JsonSave(meta)))

  def _reporting(self, step):
    return _SaveErrors(self, step)

  def restore_latest(self, abstract_state, data_iterator, defaults: dict | None = None):
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    defaults: {field: value} for fields of the state dataclass that a checkpoint written by an
    older version lacks (e.g. the step guard's state): restored without them, then filled in.
    """
    for step in sorted(self.mngr.all_steps(), reverse=True):
      self._check_process_count(step)
      error = None
      missing = {f: v for f, v in (defaults or {}).items() if f not in self._stored_fields(step)}
      target = abstract_state
      if missing:
        target = {
            f.name: getattr(abstract_state, f.name)
            for f in dataclasses.fields(abstract_state)
            if f.name not in missing
        }
      try:
        r = self.mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          data=grain.checkpoint.CheckpointRestore(data_iterator),
                                          meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any read failure means: use an older one
        error = e
      if _any_process(error is not None):
        why = 'on another process' if error is None else (
            f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}')
        moved = self._move_aside(step)
        logging.error(
            'checkpoint %s/%d is unreadable (%s); moved it to %s and trying the '
            'previous one', self.directory, step, why, moved)
        continue
      state = abstract_state.replace(**r.state, **missing) if missing else r.state
      return step, state, r.meta
    return None

  def _stored_fields(self, step: int) -> set[str]:
    """The top-level names of a checkpoint's saved state (from Orbax's _METADATA), or every
    name when they cannot be read here (remote storage, unknown layout)."""
    path = os.path.join(self.directory, str(step), 'state', '_METADATA')
    try:
      with open(path) as f:
        tree = json.load(f)['tree_metadata']
      return {v['key_metadata'][0]['key'] for v in tree.values()}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
      return _EVERYTHING

  def _check_process_count(self, step: int) -> None:
    """A checkpoint's data states are per process: refuse one written by another count."""
    if '://' in self.directory:
      return  # remote storage: leave it to grain's own check
    names = [
        os.path.basename(p)
        for p in glob.glob(os.path.join(self.directory, str(step), 'data', 'process_*-of-*.json'))
    ]
    counts = {
        int(m.group(1)) for n in names if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', n))
    }
    if counts and jax.process_count() not in counts:
      raise ValueError(
          f'checkpoint {self.directory}/{step} was written by {sorted(counts)[0]} processes; this '
          f'run has {jax.process_count()} (the data-iterator state is per process). Resume with '
          'the same number of processes, or start a new workdir.')

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    n = 0
    while os.path.exists(f'{src}.unreadable-{n}'):
      n += 1
    dst = f'{src}.unreadable-{n}'
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'yuanjax checkpoint {step} moved aside')
    self.mngr.close()
    self._open()  # rescan steps
    return dst

  def wait(self):
    with self._reporting(None):
      self.mngr.wait_until_finished()

  def close(self):
    self.wait()
    self.mngr.close()

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()


class _SaveErrors:
  """Turns any failure while saving into a SaveError naming the directory and what is kept."""

  def __init__(self, ckpt: Checkpointer, step):
    self.ckpt, self.step = ckpt, step

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is None or not isinstance(error, Exception) or isinstance(error, SaveError):
      return False
    kept = workdir_lib.steps_in(self.ckpt.directory)
    what = 'a checkpoint save' if self.step is None else f'saving step {self.step}'
    raise SaveError(f'{what} to {self.ckpt.directory} failed ({type(error).__name__}: '
                    f'{str(error).splitlines()[0][:300] if str(error) else ""}); the checkpoints '
                    f'already saved are intact (steps {kept}). Fix the disk (space, permissions) '
                    'and run the same command again to resume from the newest.') from error


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any of them."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))
