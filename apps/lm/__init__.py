"""`dlsuite lm`: character- and word-level language models: corpus, training, sampling, export."""
