"""Loading a model for any stage: one function, the profile's dtype and quantisation, checked before it is big.

What it does. :func:`load_model` turns a hub name, a local directory or an offline alias
(``smollm2``, ``qwen3-tiny``) into ``(model, tokenizer)`` the way every trkit stage, notebook and
benchmark needs it:

* the checkpoint is resolved to a local directory and its safetensors files are verified first
  (:func:`trkit.checkpoints.verify_checkpoint`: a truncated shard is an error naming it);
* GPU profiles with ``load_in_4bit`` load the frozen base as **NF4 with double quantisation**
  (QLoRA, Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") through
  ``BitsAndBytesConfig`` with the profile's compute dtype (fp16 on a T4, bf16 on an A100); otherwise
  the profile's dtype (the ``cpu`` profile: bf16 on CPUs with AVX512-BF16/AMX, else fp32);
* on CPU, every bitsandbytes ``Linear4bit`` gets ``support_avx512bf16_for_cpu = False``: otherwise an
  eval or ``no_grad`` forward repacks the 4-bit weights in place and later gradients are silently
  wrong (``../shared/OFFLINE.md``);
* for training: non-reentrant gradient checkpointing (when the profile asks for it), input
  embeddings that require grad (``enable_input_require_grads``), ``use_cache=False``;
* ``trust_remote_code=False`` always; a token comes from ``trkit.colab.hf_token`` (environment or
  Colab secrets) and is never printed;
* an optional PEFT adapter directory is attached with ``PeftModel.from_pretrained``.

:func:`preflight` runs :func:`trkit.memory.estimate_training_memory` from the config alone (nothing
big loaded) and refuses a run that will not fit the profile's GPU, naming the largest micro-batch and
sequence length that do fit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """A verified local checkpoint directory for a hub name, a directory or an offline alias."""
    from trkit.checkpoints import resolve_checkpoint, verify_checkpoint

    path = resolve_checkpoint(name_or_dir)
    verify_checkpoint(path)
    return path


def model_config(name_or_dir: str | os.PathLike):
    """The config of a checkpoint without reading (or downloading) any weights: a local directory's
    ``config.json``, an offline alias's, a built-in Qwen3 shape of :mod:`trkit.memory`, or only
    ``config.json`` fetched from the hub."""
    from trkit import assets
    from trkit.memory import BUILTIN_SHAPES

    key = str(name_or_dir)
    path = Path(key) if Path(key).exists() else Path(assets.resolve_model(key))
    if path.is_dir():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    for name, shape in BUILTIN_SHAPES.items():
        if key.lower() == name.lower():
            return shape
    from huggingface_hub import hf_hub_download

    from trkit.colab import hf_token

    return json.loads(Path(hf_hub_download(key, "config.json", token=hf_token())).read_text(encoding="utf-8"))


def disable_bnb_cpu_repacking(model) -> int:
    """Turn bitsandbytes' AVX512-BF16 CPU repacking off on every 4-bit layer; returns how many were set."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantization_config(compute_dtype):
    """NF4 + double quantisation with ``compute_dtype`` (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_tokenizer(name_or_dir: str | os.PathLike):
    """``AutoTokenizer.from_pretrained`` of a directory, hub name or alias ('qwen3', 'smollm2', ...)."""
    from transformers import AutoTokenizer

    from trkit import assets
    from trkit.colab import hf_token

    path = str(name_or_dir) if Path(str(name_or_dir)).exists() else assets.resolve_tokenizer(str(name_or_dir))
    return AutoTokenizer.from_pretrained(path, token=hf_token(), trust_remote_code=False)


def load_model(
    name_or_dir: str | os.PathLike,
    profile: Any = "auto",
    *,
    tokenizer: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: str | None = None,
    load_in_4bit: bool | None = None,
    training: bool = False,
    gradient_checkpointing: bool | None = None,
    adapter_trainable: bool = False,
):
    """``(model, tokenizer)`` for ``name_or_dir`` on ``profile`` (a name or a :class:`trkit.profiles.Profile`).

    ``dtype`` / ``load_in_4bit`` / ``gradient_checkpointing`` override the profile's. ``training``
    prepares the model for adapter training (see the module doc); otherwise it is returned in eval
    mode. ``tokenizer`` defaults to the checkpoint's own. ``adapter``: a PEFT adapter directory,
    attached with ``PeftModel.from_pretrained`` (trainable with ``adapter_trainable``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from trkit.colab import hf_token
    from trkit.profiles import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    path = resolve(name_or_dir)
    torch_dtype = getattr(torch, dtype or prof.dtype)
    four_bit = prof.load_in_4bit if load_in_4bit is None else load_in_4bit
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False, "token": hf_token()}
    if prof.attn_implementation:
        kwargs["attn_implementation"] = prof.attn_implementation
    if four_bit:
        kwargs["quantization_config"] = quantization_config(torch_dtype)
        if prof.device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not four_bit:
        model = model.to(prof.device)
    if four_bit and prof.device == "cpu":
        disable_bnb_cpu_repacking(model)
    tok = load_tokenizer(tokenizer or path)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise ValueError(f"the tokenizer ({tokenizer or path}) has {len(tok)} tokens but the model has only {rows} "
                         "embedding rows: they do not belong together (run `trkit embed` to give an extended "
                         "tokenizer its rows, or pass the model's own tokenizer)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    checkpointing = prof.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    if training:
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
    else:
        model.eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=adapter_trainable)
        if four_bit and prof.device == "cpu":
            disable_bnb_cpu_repacking(model)
        model.train(training)
    model._trkit_source = str(path)
    return model, tok


def preflight(
    model: str | os.PathLike,
    profile: Any,
    *,
    batch_size: int,
    seq_len: int,
    lora_rank: int,
    new_tokens: int = 0,
    vocab_size: int | None = None,
    optimizer: str = "adamw",
    dora: bool = False,
    load_in_4bit: bool | None = None,
    gradient_checkpointing: bool | None = None,
    gpu_memory_gb: float | None = None,
    loss_chunk: int | None = None,
) -> dict:
    """Estimate one training step's peak GPU memory before anything big is loaded; refuse a misfit.

    Returns the estimate as a dict (with ``verdict``). On a GPU profile, a total above the GPU's
    memory raises ``ValueError`` naming the largest micro-batch (at this sequence length) and the
    largest sequence length (at this micro-batch) that fit. CPU profiles are not judged (RAM, not a
    GPU, is the limit there) but still get the estimate.
    """
    from trkit.memory import GIB, estimate_training_memory, largest_fitting
    from trkit.profiles import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile, check_hardware=False)
    four_bit = prof.load_in_4bit if load_in_4bit is None else load_in_4bit
    weights = "nf4" if four_bit else ("fp16" if prof.dtype == "float16" else "bf16")
    if optimizer == "auto":  # what trkit.train picks: 8-bit AdamW on a T4
        optimizer = "adamw8bit" if prof.name == "t4" else "adamw"
    opt = {"adamw": "adamw", "adamw8bit": "adamw8bit", "paged_adamw8bit": "adamw8bit", "sophia": "sophiag"}.get(optimizer, optimizer)
    config = model_config(model)
    estimate = estimate_training_memory(
        config, weights=weights, lora_rank=lora_rank, dora=dora, new_tokens=new_tokens, vocab_size=vocab_size,
        optimizer=opt, batch_size=batch_size, seq_len=seq_len, loss_chunk=loss_chunk,
        gradient_checkpointing=prof.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing)
    report = {"model": str(model), "profile": prof.name, "total_gib": estimate.total / GIB,
              "breakdown_gib": {k: v / GIB for k, v in estimate.breakdown.items()}, "verdict": "not judged (CPU)"}
    capacity_gb = gpu_memory_gb if gpu_memory_gb is not None else prof.gpu_memory_gb
    if prof.device == "cuda" and capacity_gb:
        capacity = capacity_gb * GIB
        report["capacity_gib"] = capacity_gb
        if estimate.total > capacity:
            max_batch = largest_fitting(estimate, capacity, "batch_size")
            max_seq = largest_fitting(estimate, capacity, "seq_len")
            raise ValueError(
                f"this run needs about {estimate.total / GIB:.1f} GiB of GPU memory, more than the {capacity_gb:.0f} GiB "
                f"of the {prof.name} profile's GPU (largest terms: "
                + ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(estimate.breakdown.items(), key=lambda kv: -kv[1])[:3])
                + f" GiB). At sequence length {seq_len} the largest micro-batch that fits is {max_batch}; at micro-batch "
                f"{batch_size} the longest sequence is {max_seq}"
                + ("; with new-token rows try --optimizer adamw8bit" if new_tokens and optimizer == "adamw" else "")
                + ". Lower --batch-size (and raise --grad-accum) or --seq-len.")
        report["verdict"] = "fits"
    return report
