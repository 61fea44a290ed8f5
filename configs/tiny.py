"""A CPU-sized Yuan2.0-M32: the same structure (LFA, Attention Router, top-2 MoE, partial
rotary, tied embeddings) at tiny dims; a forward pass well under a second on a laptop.

  python -m yuanjax.stats --config configs/tiny.py
"""
import ml_collections

from yuanjax import config_lib


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = config_lib.tiny_model()
  return config
