"""How an epoch runs: cached phases on frozen-layer features, the feature cache, batch-boundary saves, precision, the first-step timer."""
