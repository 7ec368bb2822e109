"""Custom training callbacks: learning-rate step decay, learning-rate logging,
the NaN guard, an atomic best-model checkpoint and a per-epoch log."""

from dlsuite.callbacks.best_checkpoint import BestCheckpoint
from dlsuite.callbacks.epoch_log import EpochLog
from dlsuite.callbacks.lr_logger import LearningRateLogger
from dlsuite.callbacks.nan_guard import NaNGuard
from dlsuite.callbacks.step_decay import StepDecay

__all__ = ["BestCheckpoint", "EpochLog", "LearningRateLogger", "NaNGuard", "StepDecay"]
