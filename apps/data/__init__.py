"""`dlsuite data`: data preparation commands (`pack`: an image folder as TFRecord shards)."""
