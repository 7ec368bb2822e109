"""The names command-line options offer, importable without TensorFlow, so
building the parsers (and `dlsuite --help`) stays fast."""

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "lbfgs")
SCHEDULES = ("constant", "step", "exponential", "inverse_time", "cosine", "warmup", "plateau")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout")
INITIALIZERS = ("he_normal", "he_uniform", "glorot_uniform", "glorot_normal", "lecun_normal",
                "small_normal", "large_normal", "zeros")
SWITCHES = ("auto", "on", "off")
# tf.distribute strategies (core/distribute.make_strategy), and what each needs.
STRATEGIES = ("auto", "default", "one-device", "mirrored", "multi-worker", "parameter-server", "tpu")
STRATEGY_NEEDS = {"multi-worker": "reads TF_CONFIG", "parameter-server": "reads TF_CONFIG", "tpu": "reads TPU_NAME"}
# Strategies a keras-tuner trial cannot train under: each trial is a Keras fit.
UNTUNABLE_STRATEGIES = ("multi-worker", "parameter-server")


def strategy_help(strategies=STRATEGIES):
    """The --strategy help: every name, with what it needs."""
    names = [f"{name} ({STRATEGY_NEEDS[name]})" if name in STRATEGY_NEEDS else name for name in strategies]
    return f"{', '.join(names[:-1])} or {names[-1]} (default auto)"
AUGMENTATIONS = ("flip", "rotation", "zoom", "translation", "contrast")
# Pixel preprocessing a transfer backbone applies (backbones.PREPROCESSING).
TRANSFER_PREPROCESSING = ("auto", "standardize", "caffe", "tf", "torch", "raw")
# Captioning decoders (caption/model.py) and how the plain decoder turns a feature map into v.
CAPTION_CELLS = ("lstm", "gru")
CAPTION_POOLING = ("flatten", "avg", "max")
# `dlsuite diagnose init`: the seed's initializations and the stack's activations;
# `--monitor` on every app's train (callbacks/monitors.py).
INIT_STUDY = ("zeros", "small", "large", "xavier", "he")
INIT_STUDY_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")
MONITORS = ("updates", "gradients", "dead-relu")
