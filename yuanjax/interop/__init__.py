"""yuanjax.interop: other formats' checkpoints.

  hf   import/export/load of Hugging Face Yuan2.0-M32 checkpoints (`python -m yuanjax.convert`)

Import the submodule you need (`from yuanjax.interop import hf`): this package imports nothing
heavy by itself.
"""
