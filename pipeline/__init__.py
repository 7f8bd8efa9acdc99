"""Fine-tune InceptionV3 on a folder of labelled images, checkpointing as it goes.

Kept import-free so `python -m pipeline.sample_data` starts without TensorFlow.
"""
