"""yuanjax.model: the Yuan 2.0-M32 decoder in Flax Linen. See transformer.py for the API."""
from yuanjax.model.transformer import Transformer, init_cache

__all__ = ['Transformer', 'init_cache']
