"""`dlsuite tune`: hyperparameter search with keras-tuner over every app's task."""
