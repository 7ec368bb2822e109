"""What `dlsuite tune caption` searches: the captioning hyperparameters and the default space."""

import pathlib

from dlsuite.apps.core import choices, search

PARAMS = {
    "decoder": search.Param("choice", values=choices.CAPTION_CELLS),
    "attention": search.Param("bool"),
    "units": search.Param("int", 1, 16384),
    "embedding": search.Param("int", 1, 16384),
    "dropout": search.Param("float", 0.0, 1.0, high_open=True),
    # Without attention only; an attention trial reads every location.
    "pooling": search.Param("choice", values=choices.CAPTION_POOLING),
    **search.TRAINING_PARAMS,
}

# The decoder over the frozen encoder's cached features: its cell, the
# attention of Show, Attend and Tell, its widths and dropout, with batch
# size and rate. `dlsuite caption train`'s defaults (LSTM, 256 units,
# embedding 128, dropout 0.5, Adam at 0.002, clip 5) are in the space.
DEFAULTS = {
    "decoder": ["lstm", "gru"],
    "attention": [False, True],
    "units": [128, 256],
    "embedding": [64, 128],
    "dropout": {"min": 0.2, "max": 0.6},
    "batch_size": [32, 64],
    "lr": {"min": 5e-4, "max": 5e-3, "sampling": "log"},
    "optimizer": ["adam", "rmsprop"],
    "clip_norm": 5.0,
}

TUNING = search.Tuning(
    params=PARAMS, defaults=DEFAULTS,
    objectives={"val_bleu4": "max", "val_loss": "min"}, objective="val_bleu4",
    # The seed: tune on a subset. 2,000 scenes on 2 idle CPU cores: a trial
    # of 6 epochs takes 40-115 s (attention and 256 units the slowest) after
    # one encoder pass shared by all trials; the search 8 minutes, best
    # validation BLEU-4 0.71, test 0.68 (`caption train`'s defaults: 0.60).
    epochs=6, max_trials=6, data_defaults={"scenes_count": 2000},
    data_name=lambda args: pathlib.Path(args.images).name if args.images else args.dataset,
    help="search an image captioner's decoder: cell, attention, widths, dropout, batch size, lr",
    examples="""  dlsuite tune caption                                     # generated scenes, frozen random VGG-11 features
  dlsuite tune caption --objective val_loss --max-trials 12 --epochs 8
  dlsuite tune caption --images Flicker8k_Dataset --captions Flickr8k.token.txt --encoder resnet50 --encoder-weights imagenet
""",
)
