"""Errors of the model package that commands must catch without importing torch."""


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be used; the message names the file."""


def unreadable_checkpoint(path: str, what: str, exc: BaseException) -> CheckpointError:
    """The error for a file ``torch.load(weights_only=True)`` refused. PyTorch's own message suggests
    retrying with ``weights_only=False``, which would run whatever code a malicious file holds; ours says
    what to do safely instead."""
    text = str(exc)
    if "unsupported global" in text.lower():  # a pickled object, not a corrupt file
        return CheckpointError(
            f"{path}: cannot read {what}: it holds Python objects besides tensors, which are only loaded as "
            "plain weights here (unpickling them could run code). If the file comes from a source you trust, "
            "convert it on a trusted machine: `i3cl convert-checkpoint` for the original mmdetection release, "
            "or re-save its state_dict with the code that wrote it")
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return CheckpointError(f"{path}: cannot read {what}: truncated, corrupt or not a torch file ({first})")
