"""A model's size and FLOPs (`yuanjax.cost.model_facts`; abstract shapes, nothing allocated).

  python -m yuanjax.stats --config configs/yuan_m32.py [--config.model.num_experts=16]

Prints a human summary, then (last line) one JSON object:
  total_params             every parameter (a tied embedding counted once, an lm_head too)
  active_params            parameters one token uses: all non-expert params, top_k/E of
                           the routed expert params, all shared-expert params
  router_params            the routers' parameters (all layers)
  forward_flops_per_token  2 x active matmul weights (the paper's convention: excludes the
                           attention score/value products, which depend on sequence length)
  attention_flops_per_token  those products at config.model.max_seq_len (causal, averaged)
"""
from __future__ import annotations

import json

from absl import app
from ml_collections import config_flags

from yuanjax import cost


def main(argv):
  del argv
  config = _CONFIG.value
  facts = cost.model_facts(config.model)
  print(f"total params        {facts['total_params'] / 1e9:8.3f} B")
  print(f"active params/token {facts['active_params'] / 1e9:8.3f} B")
  print(f"forward GFLOPs/token {facts['forward_flops_per_token'] / 1e9:7.3f} "
        f"(+{facts['attention_flops_per_token'] / 1e9:.3f} attention at seq "
        f"{config.model.max_seq_len})")
  print(json.dumps(facts))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  app.run(main)
