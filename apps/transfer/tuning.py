"""What `dlsuite tune transfer` searches: the transfer learning hyperparameters and the default space."""

from dlsuite.apps.core import search

PARAMS = {
    # Past the backbone's count of weighted layers (batch norm aside): all of them.
    "unfreeze": search.Param("int", 0, 100_000),
    "finetune_lr_factor": search.Param("float", 0.0, 1.0, low_open=True),
    "finetune_share": search.Param("float", 0.0, 1.0, high_open=True),
    "head_dropout": search.Param("float", 0.0, 1.0, high_open=True),
    **search.TRAINING_PARAMS,
}

# The seed's recipe: how much of the backbone to fine-tune and how much
# smaller its rate should be, with the head's dropout, batch size and rate.
DEFAULTS = {
    "unfreeze": [0, 1, 2, 4, 100],
    "finetune_lr_factor": {"min": 0.01, "max": 1.0, "sampling": "log"},
    "finetune_share": [0.0, 0.3, 0.5],
    "head_dropout": {"min": 0.0, "max": 0.5},
    "batch_size": [16, 32],
    "lr": {"min": 3e-4, "max": 1e-2, "sampling": "log"},
    "optimizer": ["adam", "nesterov"],
}

TUNING = search.Tuning(
    params=PARAMS, defaults=DEFAULTS,
    objectives={"val_accuracy": "max", "val_loss": "min"}, objective="val_accuracy",
    epochs=20, max_trials=8, data_name=lambda args: args.dataset,
    help="search how to fine-tune a backbone: layers to unfreeze, their rate, head dropout, batch size, lr",
    examples="""  dlsuite tune transfer --weights saved_models/lenet5_shapes --dataset shapes --shapes-classes 8 --train-per-class 20
  dlsuite tune transfer --backbone MobileNetV2 --weights imagenet --dataset ./photos --input-size 160,160
""",
)
