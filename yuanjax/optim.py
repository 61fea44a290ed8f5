"""AdamW with linear warm-up, cosine decay to a floor, and global-norm clipping (optax).

Yuan2.0-M32 pre-training: b1 0.9, b2 0.95, wd 0.1, lr 1e-4 -> 1e-5 cosine, warm-up, clip 1.0.
Weight decay applies to weight matrices, convolutions and embeddings, not to norm scales
or biases (Megatron's convention); the choice is made from the params' logical axes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import optax


def schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at num_steps."""
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr,
                                            warmup_steps=cfg.warmup_steps, decay_steps=max(
                                                num_steps, cfg.warmup_steps + 1),
                                            end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(boxed_params):
  """True for params with >= 2 named dims besides 'layers' (matrices), False otherwise."""

  def is_matrix(p):
    names = p.names if isinstance(p, nn.LogicallyPartitioned) else ()
    return len([n for n in names if n != 'layers']) >= 2

  return jax.tree_util.tree_map(is_matrix, boxed_params,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int, boxed_params):
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask(boxed_params)),
  )
