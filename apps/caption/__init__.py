"""`dlsuite caption`: image captioning: data, decoder, beam search, export."""
