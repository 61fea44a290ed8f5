"""Joining JAX's distributed runtime, before anything touches a device.

  initialize()                                        # what the environment says
  initialize('10.0.0.1:1234', num_processes=4, process_id=i)   # explicit (launch/local.py,
                                                               # launch/gpu_slurm.py)

Three cases (`yuanjax.train` calls this with its --coordinator_address, --num_processes and
--process_id flags):

1. Explicit: any of the three given. They are passed to `jax.distributed.initialize`; when all
   three are given, JAX's cluster auto-detection is switched off (`cluster_detection_method=
   'deactivate'`), so that inside a SLURM job (which the SLURM launcher starts with explicit
   flags, one process per node) JAX does not restrict each process to GPU `SLURM_LOCALID`:
   a process keeps every GPU of its node. CPU collectives between processes go through gloo
   (`jax_cpu_collectives_implementation`, the default in jax 0.10; set if unset).
2. Detected: none given, but the environment is a multi-process job that
   `jax.distributed.initialize()` configures by itself (jax 0.10.2, `jax/_src/clusters`):
   a Cloud TPU VM (every worker of a pod slice; the coordinator and the worker's index come
   from the TPU metadata server; a single-host slice joins as 1 process, harmlessly), a SLURM
   job step with more than one task (`SLURM_NTASKS` > 1 and the step variables JAX reads),
   Open MPI (`OMPI_COMM_WORLD_SIZE` > 1), or `JAX_COORDINATOR_ADDRESS` set (then
   `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, read here, or a detected cluster give the rest).
3. Otherwise a plain single-process run: nothing is initialised.

`Preemption` says when to stop for SIGTERM/SIGINT (the same step on every process).
"""
from __future__ import annotations

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils


def detect() -> str | None:
  """The kind of multi-process environment this process runs in, or None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  try:  # set by `import jax` when libtpu and TPU chips are present (a Cloud TPU VM)
    from jax._src import cloud_tpu_init
    if cloud_tpu_init.running_in_cloud_tpu_vm:
      return 'tpu'
  except ImportError:  # pragma: no cover - jax moved it; TPU pods then need explicit flags
    pass
  slurm_step = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                'SLURM_LOCALID')
  if all(v in os.environ for v in slurm_step) and int(os.environ['SLURM_NTASKS']) > 1:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and int(os.environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1:
    return 'ompi'
  return None


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return None if v in (None, '') else int(v)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the distributed runtime when this is a multi-process run; True if it did.

  Call before anything creates a JAX backend (jax.devices(), an array, a jit).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    kind = detect()
    if kind is None:
      return False
    if kind == 'env':  # JAX reads JAX_COORDINATOR_ADDRESS itself, but not these two
      num_processes, process_id = _env_int('JAX_NUM_PROCESSES'), _env_int('JAX_PROCESS_ID')
    logging.info('multi-process environment detected (%s): jax.distributed.initialize()', kind)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes}: must be at least 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id}: must be in [0, --num_processes={num_processes})')
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  complete = None not in (coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             cluster_detection_method='deactivate' if complete else None)
  logging.info(
      'joined the JAX distributed runtime: process %d of %d, %d local / %d global '
      'devices', jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count())
  return True


class Preemption:
  """When to stop for SIGTERM/SIGINT: `reached(step)`, asked at every step.

  One process: a signal handler sets a flag. Several processes: all of them must save the same
  step, wherever the signal arrived. JAX's preemption sync manager (started by
  jax.distributed.initialize) catches SIGTERM in any process, and
  `multihost_utils.reached_preemption_sync_point(step)` turns true on every process at the same
  step (the coordination service picks it: host-side, no device work, cheap every step).
  SIGINT is re-raised as SIGTERM so that it takes the same path.
  """

  def __init__(self):
    self.signum = None
    self.multi = jax.process_count() > 1
    if self.multi:
      signal.signal(signal.SIGINT, lambda *_: signal.raise_signal(signal.SIGTERM))
    else:
      for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def reached(self, step: int) -> bool:
    if not self.multi:
      return self.signum is not None
    try:
      hit = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: no coordinated stop
      return False
    if hit:
      self.signum = signal.SIGTERM
    return hit

  def __bool__(self):
    return self.signum is not None
