"""Greedy sampling with full forwards in one jitted fixed-shape loop.

Simple and exact (the model is causal, so the unfilled tail of the buffer never changes
earlier logits); cost is one full forward per new token. For the trainer's end-of-run
sample on small models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def greedy(model, params, prompt_ids, num_tokens: int, eod_id: int | None = None) -> list[int]:
  """Appends `num_tokens` argmax tokens to `prompt_ids`; returns the new ids (cut at <eod>)."""
  P = len(prompt_ids)
  if P == 0:
    raise ValueError('greedy: the prompt must have at least one token')
  total = P + num_tokens
  buf = jnp.zeros((1, total), jnp.int32).at[0, :P].set(jnp.asarray(prompt_ids, jnp.int32))

  @jax.jit
  def run(params, buf):
    def body(i, buf):
      logits, _ = model.apply({'params': params}, buf)
      return buf.at[0, i].set(jnp.argmax(logits[0, i - 1]).astype(jnp.int32))
    return jax.lax.fori_loop(P, total, body, buf)

  out = [int(t) for t in np.asarray(run(params, buf))[0, P:]]
  if eod_id is not None and eod_id in out:
    out = out[:out.index(eod_id)]
  return out
