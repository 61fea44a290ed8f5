"""yuanjax.interop: other formats' checkpoints.

  hf         import/export of Hugging Face Yuan2.0-M32 and Mixtral checkpoints
             (`python -m yuanjax.convert`); mappings.py picks hf_mapping.py (Yuan) or
             mixtral_mapping.py by config.json's model_type
  converted  the converted format (from-hf's output: config + per-layer Orbax params)

Loading any of them (or a training workdir) for use: yuanjax.loader.

Import the submodule you need (`from yuanjax.interop import hf`): this package imports nothing
heavy by itself.
"""
