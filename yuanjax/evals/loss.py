"""The held-out loss ('loss' in config.evals.run): the LM loss (no aux losses) over
`config.train.eval_steps` batches of each mixture source's held-out rows.

Its eval-line scalars: loss, perplexity, tokens (the eval tokens scored) and eval_loss/<source>
for each named mixture source (the sources come round-robin, eval_steps batches each; `loss`
is over all of them). The run's summary keeps eval_loss.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from yuanjax.evals import evaluator
from yuanjax.loss import loss_fn


def eval_step(params, batch, *, model):
  """(sum of token losses, tokens scored) of one batch."""
  _, out = loss_fn(params, model, batch, jax.random.key(0), aux_in_loss=False)
  return out['lm_loss'] * out['tokens'], out['tokens']


@evaluator.register('loss')
class HeldOutLoss(evaluator.Evaluator):
  """Eval loss over eval_steps batches per mixture source (they come round-robin)."""

  def __init__(self, ctx: evaluator.Context, spec: evaluator.Spec):
    super().__init__(ctx, spec)
    self.step_fn = jax.jit(functools.partial(eval_step, model=ctx.model),
                           in_shardings=(ctx.param_shardings, ctx.batch_sharding),
                           out_shardings=NamedSharding(ctx.mesh, P()))

  def __call__(self, params) -> dict[str, float]:
    sums = np.zeros((max(len(self.ctx.sources), 1), 2))  # (loss sum, tokens) by source
    for i, batch in enumerate(self.ctx.make_eval_iter()):
      if i >= self.ctx.config.train.eval_steps * len(sums):
        break
      source = batch.pop('source', np.zeros(1, np.int32))[0]
      sums[source] += [float(x) for x in self.step_fn(params, self.ctx.to_device(batch))]
    total, count = sums.sum(0)
    loss = total / max(count, 1.0)
    per_source = {
        f'eval_loss/{name}': s / max(n, 1.0) for name, (s, n) in zip(self.ctx.sources, sums)
    }
    return {
        'loss': loss,
        'perplexity': float(np.exp(min(loss, 50.0))),
        'tokens': count,
        **per_source
    }

  def console(self, scalars):
    return f"eval loss {scalars['loss']:.4f}"

  def summary(self, scalars):
    return {'eval_loss': scalars['loss']}
