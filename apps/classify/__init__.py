"""`dlsuite classify`: train, evaluate and predict image classifiers."""
