"""Yuan2.0-M32 as released: 24 layers, d 2048, 32 experts top-2, Attention Router.

  python -m yuanjax.stats --config configs/yuan_m32.py
"""
import ml_collections

from yuanjax import config_lib


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = config_lib.m32_model()
  return config
