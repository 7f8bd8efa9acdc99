"""Files -> batches: the data set and its layouts, the image check before training, the sample data set."""
