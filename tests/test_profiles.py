import logging
import random

import pytest

from trkit import profiles
from trkit.profiles import Hardware, get_profile, pick_profile

CPU = Hardware(is_colab=False, python="3.11", platform="linux", cpu_count=2, system_ram_gb=24, disk_free_gb=50)
T4 = Hardware(is_colab=True, python="3.12", platform="linux", cpu_count=2, system_ram_gb=12.7, disk_free_gb=70,
              gpu_name="Tesla T4", gpu_capability=(7, 5), gpu_memory_gb=14.7, bf16=False)
A100 = Hardware(is_colab=True, python="3.12", platform="linux", cpu_count=12, system_ram_gb=83, disk_free_gb=160,
                gpu_name="NVIDIA A100-SXM4-80GB", gpu_capability=(8, 0), gpu_memory_gb=79.2, bf16=True)
L4 = Hardware(is_colab=True, python="3.12", platform="linux", cpu_count=12, system_ram_gb=50, disk_free_gb=160,
              gpu_name="NVIDIA L4", gpu_capability=(8, 9), gpu_memory_gb=22.0, bf16=True)


@pytest.mark.parametrize("hw,expected", [(CPU, "cpu"), (T4, "t4"), (A100, "a100"), (L4, "gpu")])
def test_auto_picks_profile_with_reason(hw, expected):
    name, reason = pick_profile(hw)
    assert name == expected and reason
    assert get_profile("auto", hardware=hw).name == expected


def test_profile_defaults_per_hardware():
    t4 = get_profile("t4", hardware=T4)
    assert (t4.dtype, t4.load_in_4bit, t4.gradient_checkpointing, t4.attn_implementation) == ("float16", True, True, "sdpa")
    a100 = get_profile("a100", hardware=A100)
    assert a100.dtype == "bfloat16" and a100.gpu_memory_gb == pytest.approx(79.2)
    cpu = get_profile("cpu", hardware=CPU)
    assert cpu.device == "cpu" and cpu.base_model == "smollm2"


def test_unknown_profile_and_fields_are_clear_errors():
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        get_profile("tpu", hardware=CPU)
    with pytest.raises(ValueError, match="unknown profile field"):
        get_profile("cpu", hardware=CPU, batchsize=3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        get_profile("cpu", hardware=CPU, batch_size=0)


def test_impossible_choices(caplog):
    with caplog.at_level(logging.WARNING):
        p = get_profile("t4", hardware=T4, dtype="bfloat16")
    assert p.dtype == "float16" and "fell back" in " ".join(p.notes)
    assert "bf16 is not supported" in caplog.text
    with pytest.raises(ValueError, match="FlashAttention-2 needs an Ampere"):
        get_profile("t4", hardware=T4, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        get_profile("a100", hardware=CPU)
    with pytest.raises(ValueError, match="flash_attn package is not installed"):
        get_profile("a100", hardware=A100, attn_implementation="flash_attention_2")
    # planning a T4 run from a CPU machine is allowed when the hardware check is off
    assert get_profile("t4", check_hardware=False).name == "t4"


def test_generic_gpu_without_bf16_uses_fp16():
    old = Hardware(**{**L4.as_dict(), "gpu_name": "Tesla V100", "gpu_capability": (7, 0), "bf16": False})
    assert get_profile("auto", hardware=old).dtype == "float16"


def test_seed_everything_repeats():
    import numpy as np
    import torch

    profiles.seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    profiles.seed_everything(123)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_environment_report_has_versions(monkeypatch):
    from importlib import metadata

    import torch
    import transformers

    import trkit

    report = profiles.environment_report("cpu")
    assert report["profile"]["name"] == "cpu"
    assert report["reason"].startswith("asked for 'cpu' (auto would pick")
    versions = report["versions"]
    # the versions of the packages this process actually runs, not just any non-empty string
    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["trkit"] == trkit.__version__
    # a package that is not installed is reported as None, not an error
    installed = metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(metadata, "version", version)
    versions = profiles.environment_report("cpu")["versions"]
    assert versions["bitsandbytes"] is None and versions["torch"] == torch.__version__
