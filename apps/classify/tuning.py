"""What `dlsuite tune classify` searches: the image classification hyperparameters and the default space."""

from dlsuite.apps.core import choices, search


def _cnn_names():
    from dlsuite import models

    return models.names(kind="cnn")


PARAMS = {
    "model": search.Param("choice", values=_cnn_names),
    "activation": search.Param("choice", values=choices.ACTIVATIONS),
    "kernel_initializer": search.Param("choice", values=choices.INITIALIZERS),
    "l1": search.Param("float", 0.0, 1.0),
    "l2": search.Param("float", 0.0, 1.0),
    "max_norm": search.Param("float", 0.0, 1000.0, low_open=True),
    "dropout": search.Param("float", 0.0, 1.0, high_open=True),
    "batch_norm": search.Param("bool"),
    **search.TRAINING_PARAMS,
}

# Measured on digits, 2 CPU cores: a trial of 6 epochs takes 5-15 s.
DEFAULTS = {
    "model": ["lenet5", "lenet5_caffe"],
    "batch_norm": [True, False],
    "batch_size": [16, 32, 64, 128],
    "lr": {"min": 1e-4, "max": 0.1, "sampling": "log"},
    "optimizer": ["adam", "nesterov", "rmsprop"],
    "lr_schedule": ["constant", "cosine"],
    "dropout": {"min": 0.0, "max": 0.5},
    "l2": {"min": 1e-6, "max": 1e-2, "sampling": "log"},
}

TUNING = search.Tuning(
    params=PARAMS, defaults=DEFAULTS,
    objectives={"val_accuracy": "max", "val_loss": "min"}, objective="val_accuracy",
    # Measured on 2 shared CPU cores: 10 trials of 6 epochs on digits take
    # about 2 minutes and reach 97-99% validation accuracy.
    epochs=6, max_trials=10, data_name=lambda args: args.dataset,
    fixing_options={"model": "fix the architecture, a registry name (default: search the space's models)"},
    help="search an image classifier's hyperparameters",
    examples="""  dlsuite tune classify                                    # random search on the bundled digits
  dlsuite tune classify --max-trials 30 --epochs 10 --space space.yaml
  dlsuite tune classify --tuner hyperband --epochs 27 --objective val_loss
  dlsuite tune classify --model resnet18 --dataset shapes --image-size 32
""",
)
