"""Custom training callbacks: learning-rate step decay, learning-rate logging,
the NaN guard, an atomic best-model checkpoint, a per-epoch log, a progress
line inside the epoch when the output is not a terminal, and the training
monitors (update ratio, gradient norm, dead ReLUs)."""

from dlsuite.callbacks.best_checkpoint import BestCheckpoint
from dlsuite.callbacks.epoch_log import EpochLog
from dlsuite.callbacks.lr_logger import LearningRateLogger
from dlsuite.callbacks.monitors import (
    DeadReluMonitor,
    GradientNormMonitor,
    MonitorReport,
    UpdateRatioMonitor,
    make_monitors,
)
from dlsuite.callbacks.nan_guard import NaNGuard
from dlsuite.callbacks.progress import EpochProgress
from dlsuite.callbacks.step_decay import StepDecay

__all__ = [
    "BestCheckpoint", "DeadReluMonitor", "EpochLog", "EpochProgress", "GradientNormMonitor", "LearningRateLogger", "MonitorReport",
    "NaNGuard", "StepDecay", "UpdateRatioMonitor", "make_monitors",
]
