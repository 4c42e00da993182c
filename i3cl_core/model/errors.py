"""Errors of the model package that commands must catch without importing torch."""

import re


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be used; the message names the file."""


def pickled_code(torch_message: str) -> str:
    """One sentence on a file that ``torch.load(weights_only=True)`` refused for a pickled global, naming
    it."""
    m = re.search(r"GLOBAL ([\w.]+)", torch_message)
    named = f" (it names {m.group(1)})" if m else ""
    return (
        f"the file holds pickled Python objects besides tensors{named}: rebuilding them means running code "
        "the file chooses (unpickling could run code), so it is refused."
    )


def unreadable_checkpoint(path: str, what: str, exc: BaseException) -> CheckpointError:
    """The error for a file ``torch.load(weights_only=True)`` refused. PyTorch's own message suggests
    retrying with ``weights_only=False``, which would run whatever code a malicious file holds; ours says
    what to do safely instead."""
    text = str(exc)
    if "unsupported global" in text.lower():  # a pickled object, not a corrupt file
        return CheckpointError(
            f"{path}: cannot read {what}: {pickled_code(text)} "
            "Nothing in it was run. If the file comes from a "
            "source you trust, convert it on a trusted machine: `i3cl convert-checkpoint` for the original "
            "mmdetection release, or re-save only its tensors (its state_dict) with the program that wrote it"
        )
    if "weights only load failed" in text.lower():  # PyTorch's text goes on with how to load it unsafely
        m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        why = m.group(1).strip()[:160] if m else "pickled content other than tensors"
        return CheckpointError(
            f"{path}: cannot read {what}: refused by the weights-only reader ({why}); the file is "
            "corrupt or holds pickled objects, and nothing in it was run"
        )
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return CheckpointError(f"{path}: cannot read {what}: truncated, corrupt or not a torch file ({first})")
