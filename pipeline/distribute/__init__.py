"""Training on several devices or machines: tf.distribute strategies, TF_CONFIG, local worker processes."""
