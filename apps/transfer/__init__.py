"""`dlsuite transfer`: features from a trained backbone, and fine-tuning it on a new task."""
