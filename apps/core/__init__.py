"""What every app runs on: the task lifecycle and the training engine,
optimizers and schedules, distribution strategies, run directories, export
versions, the shared training options and the user-error type. Imports no
app and no CLI module."""
