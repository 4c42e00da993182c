"""The one device rule (i3cl_core/devices.py) as training, inference and the ensemble see it."""

from __future__ import annotations

import pytest
import torch

from i3cl_core.devices import resolve_device, resolve_devices

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@no_cuda
def test_a_machine_without_gpus_runs_on_the_cpu_and_refuses_a_gpu_by_name():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu", local_rank=3)
    assert resolve_devices("auto") == ["cpu"] and resolve_devices(["cpu", "auto"]) == ["cpu", "cpu"]
    with pytest.raises(ValueError, match=r"train.device: 'cuda' requested but this machine has 0 visible"):
        resolve_device("cuda", "train.device")
    with pytest.raises(ValueError, match=r"infer.devices: 'cuda:1' requested"):
        resolve_devices(["cpu", "cuda:1"])


def test_names_that_are_not_devices_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"--device: 'gpu0' is not a device"):
        resolve_device("gpu0", "--device")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="infer.devices: give 'auto' or at least one device"):
        resolve_devices([])


@no_cuda
def test_training_on_a_missing_gpu_is_a_config_error():
    from i3cl_core.config import ConfigError
    from i3cl_core.engine.train import init_distributed

    with pytest.raises(ConfigError, match="train.device"):
        init_distributed("cuda:0")
    assert init_distributed("auto").device == torch.device("cpu")
