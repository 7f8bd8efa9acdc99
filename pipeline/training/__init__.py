"""How an epoch runs.

Cached phases on frozen-layer features, the feature cache, batch-boundary saves, precision, the first-step timer.
"""
