"""Mixed precision: layers compute in 16 bits, variables and the softmax stay float32.

Keras applies the global policy to every layer created after it is set, so it
is set before the model is built. The variables stay float32 under the mixed
policies, so checkpoints, resume and the final .h5 hold float32 weights
whatever the precision; `mixed_float16` also wraps the optimizer in Keras's
loss scaling (its state is saved with the optimizer's).
"""

from __future__ import annotations

import keras


def set_precision(name: str) -> None:
    """`float32`, `mixed_bfloat16` (CPUs with bf16 instructions) or `mixed_float16` (GPUs)."""
    keras.mixed_precision.set_global_policy(name)
