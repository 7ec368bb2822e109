"""A MobileNetV2 "ImageNet" file in a Keras cache of the test's own, offline, in this process."""

import h5py
import keras
from keras.src.backend import config as keras_config
from keras.src.legacy.saving import legacy_h5_format

MOBILENET_V2_NO_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def cached_mobilenet_v2(folder, monkeypatch):
    """Writes a randomly initialized MobileNetV2 (no top, 32x32x3) as the file Keras downloads for
    ImageNet weights into `folder`/models, points Keras's home at `folder` and cuts the network.

    Keras reads $KERAS_HOME when imported, which this process did already, so its home is patched;
    test_cnn_models.py checks $KERAS_HOME itself in a fresh process. Returns the model, whose
    outputs are what the weights must give.
    """
    (folder / "models").mkdir()
    reference = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    with h5py.File(folder / "models" / MOBILENET_V2_NO_TOP, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, reference)
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(folder))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network, whatever the machine has
    return reference
