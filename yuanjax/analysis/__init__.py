"""Routing analysis shared by `yuanjax.report` and the notebooks.

`routing_stats`: NumPy statistics over expert loads and routing decisions (no JAX, no plotting).
`routing`: one jitted forward returning what every MoE layer's router decided.
`plots`: matplotlib figures of those statistics. `texts`: code vs. prose text sets.
`notebook`: what notebooks/ share (smoke switch, quickstart config) and their runner.
"""
