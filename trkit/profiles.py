"""Hardware profiles: detect the machine (Colab or not, GPU, bf16, memory) and pick training defaults.

A profile is the set of defaults later stages read (compute dtype, 4-bit loading, batch, sequence
length, gradient checkpointing, attention kernel, base model). Four exist:

* ``cpu``  - tests and the offline demo: offline SmolLM2-135M, short sequences; bf16 on CPUs with
  AVX512-BF16 or AMX (about 5x faster than fp32 there), fp32 on others (bf16 is emulated, slow).
* ``t4``   - free Colab (T4, 15 GB, compute capability 7.5): fp16 compute, no bf16, no
  FlashAttention-2, QLoRA (NF4 + double quant), gradient checkpointing.
* ``a100`` - Colab Pro / cloud A100 40 or 80 GB: bf16, SDPA (or FlashAttention-2 when installed).
* ``gpu``  - any other CUDA card: bf16 if the card supports it, else fp16; QLoRA.

Impossible choices (bf16 or FlashAttention-2 on a T4, a GPU profile without a GPU) are refused with
a message that says what to change, or, for the dtype, fall back with a logged warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import random
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # "cpu" | "cuda"
    dtype: str  # compute dtype name, one of DTYPES
    load_in_4bit: bool  # QLoRA: NF4 + double quantisation for the frozen base
    batch_size: int  # micro-batch per device
    grad_accum: int
    max_seq_len: int
    gradient_checkpointing: bool
    attn_implementation: str
    base_model: str  # hub name, or an offline asset name ('smollm2', 'qwen3-tiny')
    corpus: str  # 'default' (offline assets) or a hub dataset name
    gpu_memory_gb: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        name="cpu", device="cpu", dtype="float32", load_in_4bit=False, batch_size=4, grad_accum=1,
        max_seq_len=256, gradient_checkpointing=False, attn_implementation="sdpa",
        base_model="smollm2", corpus="default",
    ),
    "t4": Profile(
        name="t4", device="cuda", dtype="float16", load_in_4bit=True, batch_size=1, grad_accum=16,
        max_seq_len=1024, gradient_checkpointing=True, attn_implementation="sdpa",
        base_model="Qwen/Qwen3-8B", corpus="HuggingFaceFW/fineweb-2:tur_Latn", gpu_memory_gb=15.0,
    ),
    "a100": Profile(
        # batch 2 x 2048: at batch 8 the fp32 logits of Qwen3's 151,936-row vocabulary alone are 28 GiB
        # (trkit.memory's estimate), an OOM on an A100-40.
        name="a100", device="cuda", dtype="bfloat16", load_in_4bit=False, batch_size=2, grad_accum=16,
        max_seq_len=2048, gradient_checkpointing=True, attn_implementation="sdpa",
        base_model="Qwen/Qwen3-8B", corpus="HuggingFaceFW/fineweb-2:tur_Latn", gpu_memory_gb=40.0,
    ),
    "gpu": Profile(
        name="gpu", device="cuda", dtype="bfloat16", load_in_4bit=True, batch_size=1, grad_accum=16,
        max_seq_len=1024, gradient_checkpointing=True, attn_implementation="sdpa",
        base_model="Qwen/Qwen3-8B", corpus="HuggingFaceFW/fineweb-2:tur_Latn",
    ),
}


@dataclass(frozen=True)
class Hardware:
    is_colab: bool
    python: str
    platform: str
    cpu_count: int
    system_ram_gb: float
    disk_free_gb: float
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    gpu_memory_gb: float = 0.0
    bf16: bool = False
    flash_attn_installed: bool = False
    cpu_bf16: bool = False  # the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def detect_hardware() -> Hardware:
    """What this machine has. Imports torch only to ask about CUDA."""
    import importlib.util

    import psutil

    gpu_name = cap = None
    gpu_mem = 0.0
    bf16 = False
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu_name = props.name
            cap = (props.major, props.minor)
            gpu_mem = props.total_memory / 2**30
            bf16 = cap >= (8, 0)  # Ampere and newer; a T4 (7.5) emulates bf16 slowly, so we say no
    except ImportError:
        pass
    cpu_bf16 = False
    try:
        import torch

        cpu_bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        pass
    return Hardware(
        is_colab=is_colab(),
        python=platform.python_version(),
        platform=platform.platform(terse=True),
        cpu_count=os.cpu_count() or 1,
        system_ram_gb=round(psutil.virtual_memory().total / 2**30, 1),
        disk_free_gb=round(shutil.disk_usage(os.getcwd()).free / 2**30, 1),
        gpu_name=gpu_name,
        gpu_capability=cap,
        gpu_memory_gb=round(gpu_mem, 1),
        bf16=bf16,
        flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
        cpu_bf16=cpu_bf16,
    )


def pick_profile(hw: Hardware) -> tuple[str, str]:
    """(profile name, the reason in words) for this hardware."""
    if hw.gpu_name is None:
        dtype = "bf16: this CPU has AVX512-BF16/AMX" if hw.cpu_bf16 else "fp32: this CPU has no native bf16"
        return "cpu", f"no CUDA GPU found: CPU demo profile (offline SmolLM2, {dtype})"
    name = hw.gpu_name.lower()
    if "t4" in name or hw.gpu_capability == (7, 5):
        return "t4", f"{hw.gpu_name} (compute {hw.gpu_capability}): fp16, no bf16, no FlashAttention-2, QLoRA"
    if "a100" in name or "h100" in name or "h200" in name:
        return "a100", f"{hw.gpu_name} ({hw.gpu_memory_gb:.0f} GB, compute {hw.gpu_capability}): bf16"
    return "gpu", f"{hw.gpu_name} ({hw.gpu_memory_gb:.0f} GB): generic GPU defaults, QLoRA"


def get_profile(name: str = "auto", hardware: Hardware | None = None, check_hardware: bool = True, **overrides) -> Profile:
    """The profile ``name`` ('auto' picks from the hardware), with ``overrides`` applied and checked.

    ``check_hardware=False`` skips the checks against this machine (planning a T4 run from a laptop).
    """
    name = (name or "auto").lower()
    if name != "auto" and name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of: auto, {', '.join(PROFILES)}")
    hw = hardware
    if name == "auto" or check_hardware:
        hw = hw or detect_hardware()
    if name == "auto":
        name, reason = pick_profile(hw)
        log.info("profile %s: %s", name, reason)
    profile = PROFILES[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if unknown:
        raise ValueError(f"unknown profile field(s) {sorted(unknown)}; valid fields: {[f.name for f in dataclasses.fields(Profile)]}")
    notes = list(profile.notes)
    if hw is not None and check_hardware:
        if profile.device == "cuda" and hw.gpu_name is None:
            raise ValueError(f"profile {name!r} needs a CUDA GPU and none was found; use profile='cpu' (or 'auto')")
        if name == "a100" and "gpu_memory_gb" not in overrides and hw.gpu_memory_gb:
            overrides["gpu_memory_gb"] = hw.gpu_memory_gb
        if name == "gpu":
            overrides.setdefault("gpu_memory_gb", hw.gpu_memory_gb)
            if not hw.bf16 and overrides.get("dtype", "bfloat16") == "bfloat16":
                overrides["dtype"] = "float16"
                notes.append("no bf16 on this GPU: fp16 compute")
    if name == "cpu" and hw is not None and "dtype" not in overrides and hw.cpu_bf16:
        overrides["dtype"] = "bfloat16"
        notes.append("bf16 on this CPU (AVX512-BF16/AMX): about 5x faster than fp32")
    dtype = overrides.get("dtype", profile.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    attn = overrides.get("attn_implementation", profile.attn_implementation)
    if attn not in ATTENTION:
        raise ValueError(f"attn_implementation {attn!r} is not one of {ATTENTION}")
    no_bf16 = name == "t4" or (hw is not None and check_hardware and profile.device == "cuda" and not hw.bf16)
    if dtype == "bfloat16" and no_bf16:
        log.warning("bf16 is not supported on this GPU (T4-class, compute < 8.0): falling back to float16")
        notes.append("bf16 requested but unsupported: fell back to float16")
        overrides["dtype"] = "float16"
    if attn == "flash_attention_2":
        if name in ("t4", "cpu") or (hw is not None and check_hardware and (hw.gpu_capability or (0, 0)) < (8, 0)):
            raise ValueError("FlashAttention-2 needs an Ampere or newer GPU (not a T4, not the CPU); use attn_implementation='sdpa'")
        if hw is not None and check_hardware and not hw.flash_attn_installed:
            raise ValueError("attn_implementation='flash_attention_2' but the flash_attn package is not installed; pip install flash-attn or use 'sdpa'")
    if overrides.get("load_in_4bit") and (overrides.get("device", profile.device) == "cpu"):
        notes.append("4-bit on CPU: slow, for tests only")
    for key in ("batch_size", "grad_accum", "max_seq_len"):
        if key in overrides and int(overrides[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {overrides[key]}")
    return dataclasses.replace(profile, **overrides, notes=tuple(notes))


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run can be repeated."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    except ImportError:
        pass


def environment_report(profile_name: str = "auto") -> dict[str, Any]:
    """Hardware, chosen profile with its reason, and library versions, as one dict."""
    from importlib import metadata

    hw = detect_hardware()
    name, reason = pick_profile(hw)
    if profile_name != "auto":
        reason = f"asked for {profile_name!r} (auto would pick {name!r}: {reason})"
        name = profile_name
    profile = get_profile(name, hardware=hw)
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "safetensors", "trkit"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"hardware": hw.as_dict(), "profile": profile.as_dict(), "reason": reason, "versions": versions}


def add_arguments(parser) -> None:
    parser.add_argument("--profile", default="auto", help="profile to report (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_cli(args) -> int:
    import json

    report = environment_report(args.profile)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    hw, prof = report["hardware"], report["profile"]
    print(f"machine : {'Colab' if hw['is_colab'] else 'local'}, Python {hw['python']}, {hw['cpu_count']} CPUs, "
          f"{hw['system_ram_gb']} GB RAM, {hw['disk_free_gb']} GB disk free")
    print(f"GPU     : {hw['gpu_name'] or 'none'}" + (f" ({hw['gpu_memory_gb']} GB, compute {hw['gpu_capability']}, bf16={hw['bf16']})" if hw['gpu_name'] else ""))
    print(f"profile : {prof['name']} - {report['reason']}")
    print("          " + ", ".join(f"{k}={prof[k]}" for k in ("dtype", "load_in_4bit", "batch_size", "grad_accum", "max_seq_len", "gradient_checkpointing", "attn_implementation", "base_model")))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    return 0
