"""Errors of the model package that commands must catch without importing torch."""


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be used; the message names the file."""
