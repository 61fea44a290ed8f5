"""Orbax checkpoints: train state and grain iterator state saved together, async.

Layout: WORKDIR/checkpoints/<step>/{state,data,meta}. Orbax writes each save into a
temporary directory and renames it when complete, so a save cut short (SIGKILL mid-save)
never looks like a checkpoint. A checkpoint that looks complete but cannot be read (a file
truncated or removed) is reported, moved aside to `<step>.unreadable-<n>` (never deleted),
and the previous good one is used.
"""
from __future__ import annotations

import logging
import os

import grain
import orbax.checkpoint as ocp


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
    self.mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, abstract_state, data_iterator):
    """(step, state, meta) of the newest readable checkpoint, or None if there is none."""
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        r = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any read failure means: use an older one
        moved = self._move_aside(step)
        logging.error('checkpoint %s/%d is unreadable (%s: %s); moved it to %s and trying the '
                      'previous one', self.directory, step, type(e).__name__,
                      str(e).splitlines()[0][:300], moved)
        continue
      return step, r.state, r.meta
    return None

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    n = 0
    while os.path.exists(f'{src}.unreadable-{n}'):
      n += 1
    dst = f'{src}.unreadable-{n}'
    os.rename(src, dst)
    self.mngr.close()
    self._open()          # rescan steps
    return dst

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()
