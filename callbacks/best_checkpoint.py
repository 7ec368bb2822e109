"""Keep the best model seen so far, written atomically."""

import math
import os

import keras


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model to `path` (a `.keras` file) whenever `monitor` improves.

    The file is written beside its final name and renamed into place, so a
    crash mid-save never leaves a broken checkpoint; a NaN or infinite value
    never counts as an improvement, so the last good model stays.

    Args:
        path: destination, ending in `.keras`.
        monitor: a key of the epoch logs, such as "val_loss".
        mode: "min" or "max".
        best: the best value already reached (when resuming), or None.
        save: save(model, path) writing the file atomically its own way
            (the apps' `engine.save_model`: owner-named temporaries, a full
            disk one line); None: a temporary beside it, then a rename.
    """

    def __init__(self, path, monitor="val_loss", mode="min", best=None, save=None):
        super().__init__()
        self.save = save
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', received {mode!r}.")
        if not str(path).endswith(".keras"):
            raise ValueError(f"path must end with .keras, received {path!r}.")
        self.path = str(path)
        self.monitor = monitor
        self.mode = mode
        self.best = best
        self.best_epoch = None

    def _improved(self, value):
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        value = None if value is None else float(value)
        # A run the NaN guard stopped ended its epoch early: not a model to keep.
        if not self._improved(value) or getattr(self.model, "stop_training", False):
            return
        self.best, self.best_epoch = value, epoch
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if self.save is not None:
            self.save(self.model, self.path)
            return
        temporary = self.path[: -len(".keras")] + ".tmp.keras"
        self.model.save(temporary)
        os.replace(temporary, self.path)
