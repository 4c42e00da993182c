"""Where the model computes in bfloat16: does the device do it natively, the heads' training context."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (else bf16 autocast is emulated and
    slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:  # x86 with AVX512-BF16 or AMX; elsewhere oneDNN emulates bfloat16
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def uses_bf16(setting: bool | str, device: torch.device) -> bool:
    """A ``bf16_*`` model setting (True, False or ``"auto"``: where the device computes it natively)."""
    return setting is True or (setting == "auto" and native_bf16(device))


def heads_autocast(setting: bool | str, device: torch.device, training: bool):
    """The context of the RPN head and the RoI heads' layers: bfloat16 autocast in training when
    ``model.bf16_heads`` says so and no other autocast (the trainer's CUDA AMP) is active, else none."""
    if training and uses_bf16(setting, device) and not torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
