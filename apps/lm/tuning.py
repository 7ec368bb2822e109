"""What `dlsuite tune lm` searches: the language modeling hyperparameters and the default space."""

from dlsuite.apps.core import search

PARAMS = {
    # bilstm has two outputs and reports other metric names; tune it by hand.
    "cell": search.Param("choice", values=("lstm", "gru", "rnn")),
    "layers": search.Param("int", 1, 16),
    "units": search.Param("int", 1, 16384),
    "embedding": search.Param("int", 1, 16384),
    "dropout": search.Param("float", 0.0, 1.0, high_open=True),
    "seq_len": search.Param("int", 2, 100_000),
    **search.TRAINING_PARAMS,
}

# Measured on 200k characters, 2 shared CPU cores: a 2x128 GRU at batch
# 16, sequences of 50 and lr 0.005 reaches validation loss 1.86
# (perplexity 6.4, unigram 23) in 2 epochs, about 50 s. Short sequences
# and small batches give a short search many updates.
DEFAULTS = {
    "cell": ["lstm", "gru"],
    "layers": {"min": 1, "max": 2},
    "units": [64, 128, 256],
    "embedding": [32, 64],
    "batch_size": [16, 32],
    "lr": {"min": 1e-3, "max": 1e-2, "sampling": "log"},
    "optimizer": ["adam", "rmsprop"],
    "lr_schedule": ["constant", "cosine"],
    "dropout": {"min": 0.0, "max": 0.2},
    "seq_len": 50,
    # The seed's fix for exploding RNN gradients, as `lm train` defaults.
    "clip_norm": 5.0,
}

TUNING = search.Tuning(
    params=PARAMS, defaults=DEFAULTS,
    objectives={"val_loss": "min", "val_perplexity": "min", "val_accuracy": "max"}, objective="val_loss",
    epochs=2, max_trials=8, data_name=lambda args: args.text or args.dataset or "stdlib-docstrings",
    # The seed: use a subset of the data for hyperparameter tuning.
    data_defaults={"max_chars": 200_000},
    extra_options=(("test_fraction", "--test-fraction", {
        "type": float, "default": 0.1, "help": "the end of the text, scored once by the best model (default 0.1)"}),),
    help="search a language model's hyperparameters",
    examples="""  dlsuite tune lm                                          # char LSTM/GRU on the standard library's docstrings
  dlsuite tune lm --text book.txt --level word --max-trials 20 --space lm_space.yaml
""",
)
