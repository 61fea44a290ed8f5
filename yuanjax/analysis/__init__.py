"""Routing analysis shared by `yuanjax.report` and the notebooks.

`stats`: NumPy statistics over expert loads and routing decisions (no JAX, no plotting).
"""
