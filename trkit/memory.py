"""GPU memory: a pre-flight estimate from a model config, and a monitor that measures a real run.

**Estimator** (:func:`estimate_training_memory`): the peak memory of one LoRA / QLoRA / DoRA training
step of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3: SmolLM2 and Qwen3 here), from the
config alone, as a breakdown that adds up to the total:

* ``weights``: decoder linears at 0.5 byte/param (NF4, + 4/64 byte absmax per 64-weight block, or
  about 1.02/64 with double quantisation: 8-bit absmax plus an fp32 scale per 256 blocks; Dettmers
  et al. 2023, QLoRA), 1 byte + an fp32 scale per output row (LLM.int8), or 2 bytes (bf16/fp16).
  Embeddings, ``lm_head`` and norms stay in the 2-byte compute dtype (bitsandbytes leaves them).
* ``adapters``: LoRA A and B (r x (in + out) per target; Hu et al. 2021), DoRA's magnitude vector
  (out per target; Liu et al. 2024), trainable new-token rows (PEFT ``trainable_token_indices``:
  an fp32 delta plus a copy of the original rows, once if the embeddings are tied, else twice).
  PEFT upcasts adapter weights to fp32, so 4 bytes each.
* ``gradients``: 4 bytes per trainable parameter.
* ``optimizer_state``: AdamW 2 x 4 bytes per trainable parameter; bitsandbytes 8-bit AdamW 2 x 1
  byte + an fp32 absmax per 256-value block (tensors under 4096 values stay 32-bit, as bnb does);
  SophiaG m (4) + fp32 h (4) (its GNB pass is a forward/backward like a training step: no extra peak).
* ``activations``: what autograd saves for backward. Per token and decoder layer, for the Hugging
  Face Qwen3/Llama code with PEFT LoRA under fp16/bf16 autocast (a = 2 bytes), counted tensor by
  tensor with ``torch.autograd.graph.saved_tensors_hooks`` (see ``benchmarks/bench_memory.py``):
  two RMSNorms keep an fp32 copy of their input and the variance (2 x (4H + 4)); Qwen3's q/k norms
  the same on the heads (4Q + 4nh + 4KV + 4nkv); SDPA / FlashAttention keeps q, k, v, the output
  and an fp32 log-sum-exp (a(2Q + 2KV) + 4nh); SwiGLU keeps gate, silu(gate) and up (3aI); every
  LoRA target keeps its own half-precision copy of its input (PEFT casts the input to the adapter
  dtype, autocast casts it back) and the rank-r product (a(in + r)); DoRA adds the base and LoRA
  outputs (2a out). With gradient checkpointing a layer keeps only its input (aH) and one layer is
  recomputed at a time (its full set, counted once). Autocast also caches a half copy of every
  adapter weight (2 bytes per LoRA parameter). Weights are frozen, so no base GEMM keeps its input.
* ``logits``: the classic T4 OOM. transformers upcasts the logits to fp32 for the loss; at the start
  of backward the saved fp32 log-softmax, the fp32 gradient of the loss and the fp32 gradient of
  the logits coexist: 12 bytes x batch x sequence x vocabulary (151,936 rows for Qwen3). trkit's
  own training stage computes the loss in chunks (``loss_chunk`` positions): (4 + 2) bytes x chunk x
  vocabulary + 4 bytes x tokens x hidden.
* ``workspace``: transient buffers at the largest layer: NF4/int8 matmuls dequantise one weight
  to 16 bits (2 in out); PEFT's DoRA builds B A through an identity matrix and the merged weight
  for the norm (6 in^2 + 8 in out, at the largest target); trainable new-token rows merge a full
  copy of ``lm_head`` (kept for backward) and get a dense gradient of it (2 x 2 V H).
* ``cuda_context``: CUDA context, cuBLAS/cuDNN handles and bitsandbytes kernels, outside torch's
  allocator but inside nvidia-smi's number (0.5 GiB by default).
* ``allocator_reserve``: the caching allocator's slack (reserved minus allocated), 5 % of the rest.

The verdict compares the total with the GPU's memory as nvidia-smi reports it (T4 15 GiB, A100
40/80 GiB) and searches the largest sequence length (at the batch) and batch (at the sequence
length) that fit. On CPU the activation model equals the bytes autograd keeps (ratio 1.00 for
Qwen3 and Llama configs, all or some LoRA targets) and the logits term matches the measured peak
(12.07 bytes; ``benchmarks/bench_memory.py``, tests/test_memory.py). The whole estimate has **not**
yet been compared with measured CUDA peaks (the goal is +-15 %).

**Monitor** (:class:`MemoryMonitor`): samples process RSS and system RAM (psutil) and, on CUDA, torch's
allocated / reserved memory and the device total nvidia-smi sees (NVML via ``torch.cuda``) on a
background thread; named phases (``with monitor.phase("load model"):``) keep their own peaks
(CUDA peaks exactly, from ``torch.cuda.max_memory_allocated``); ``table()`` and ``plot()`` summarise.
``MemoryCallback`` (a ``transformers.TrainerCallback``) writes a sample into the Trainer's
``state.log_history`` every N steps.

CLI: ``python -m trkit memory --model Qwen/Qwen3-8B --profile t4`` (a built-in table of Qwen3 and
SmolLM2 architecture facts, or a local ``config.json`` / model directory; no download, no weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

GIB = 2**30

# --------------------------------------------------------------------------------------------
# Architecture facts
# --------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family config that memory depends on."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear layer of one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def biased(self) -> set[str]:
        if self.model_type == "qwen2":  # q, k, v carry biases in Qwen2, o does not
            return {"q_proj", "k_proj", "v_proj"}
        out = set()
        if self.attention_bias:
            out |= {"q_proj", "k_proj", "v_proj", "o_proj"}
        if self.mlp_bias:
            out |= {"gate_proj", "up_proj", "down_proj"}
        return out

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "ModelShape":
        """From a ``transformers`` config object or its ``config.json`` dict."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the estimator; it knows "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            model_type=model_type, vocab_size=int(get("vocab_size")), hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")), num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads, num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=int(get("max_position_embeddings") or 32768),
            attention_bias=bool(get("attention_bias", model_type == "qwen2")), mlp_bias=bool(get("mlp_bias", False)),
            name=name or str(get("_name_or_path", "") or ""),
        )


def _qwen3(name, hidden, inter, layers, heads, tied):
    return ModelShape("qwen3", 151936, hidden, inter, layers, heads, 8, 128, tied, 40960, name=name)


# Architecture facts from the published config.json files (the hub is not needed to plan a run).
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen3-0.6B": _qwen3("Qwen/Qwen3-0.6B", 1024, 3072, 28, 16, True),
    "Qwen/Qwen3-1.7B": _qwen3("Qwen/Qwen3-1.7B", 2048, 6144, 28, 16, True),
    "Qwen/Qwen3-4B": _qwen3("Qwen/Qwen3-4B", 2560, 9728, 36, 32, True),
    "Qwen/Qwen3-8B": _qwen3("Qwen/Qwen3-8B", 4096, 12288, 36, 32, False),
    "HuggingFaceTB/SmolLM2-135M": ModelShape("llama", 49152, 576, 1536, 30, 9, 3, 64, True, 8192,
                                             name="HuggingFaceTB/SmolLM2-135M"),
}
_ALIASES = {"qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B",
            "qwen3-8b": "Qwen/Qwen3-8B", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
            "huggingfacetb/smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M"}


def model_shape(model: str | os.PathLike | Mapping | ModelShape | Any) -> ModelShape:
    """A :class:`ModelShape` from a built-in name, a ``config.json`` / model directory, a dict or a config."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, Mapping) or hasattr(model, "model_type"):
        return ModelShape.from_config(model)
    key = str(model)
    for name in BUILTIN_SHAPES:
        if key.lower() == name.lower():
            return BUILTIN_SHAPES[name]
    if key.lower() in _ALIASES:
        return BUILTIN_SHAPES[_ALIASES[key.lower()]]
    path = Path(key).expanduser()
    if not path.exists() and key.lower() in ("smollm2", "qwen3-tiny", "tiny-qwen3"):
        from trkit import assets

        path = Path(assets.resolve_model(key))
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); pass a model's config.json") from None
        return ModelShape.from_config(config, name=str(path.parent))
    raise FileNotFoundError(f"unknown model {key!r}: pass a local config.json or model directory, or one of "
                            f"{', '.join(BUILTIN_SHAPES)} (the hub is not consulted)")


def count_parameters(shape: ModelShape) -> dict[str, int]:
    """Exact parameter counts of the Hugging Face model built from ``shape`` (no LoRA)."""
    h, v = shape.hidden_size, shape.vocab_size
    biased = shape.biased()
    linear = sum(i * o + (o if name in biased else 0) for name, (i, o) in shape.linear_shapes().items())
    norms = 2 * h + (2 * shape.head_dim if shape.model_type == "qwen3" else 0)
    per_layer = linear + norms
    counts = {
        "embed_tokens": v * h,
        "decoder_linear": shape.num_hidden_layers * linear,
        "decoder_norms": shape.num_hidden_layers * norms + h,  # + the final norm
        "lm_head": 0 if shape.tie_word_embeddings else v * h,
    }
    counts["per_layer"] = per_layer
    counts["total"] = counts["embed_tokens"] + counts["decoder_linear"] + counts["decoder_norms"] + counts["lm_head"]
    return counts


def lora_parameters(shape: ModelShape, rank: int, targets=ALL_TARGETS, dora: bool = False) -> dict[str, int]:
    """LoRA A+B (and DoRA magnitude) parameters over all layers, and the largest single tensor."""
    shapes = shape.linear_shapes()
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(shapes)}")
    lora = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets) * shape.num_hidden_layers
    magnitude = sum(shapes[t][1] for t in targets) * shape.num_hidden_layers if dora else 0
    return {"lora": lora, "dora_magnitude": magnitude, "total": lora + magnitude}


# --------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------

WEIGHT_FORMATS = ("nf4", "int8", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "sophiag")
# GPU memory as nvidia-smi reports it (MiB totals 15360 / 40960 / 81920).
GPUS: dict[str, float] = {"t4": 15.0, "a100-40": 40.0, "a100-80": 80.0}

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' optimizer state in 32 bit
BNB_OPTIM_BLOCK = 256  # values per fp32 absmax in 8-bit blockwise optimizer state
NF4_BLOCK = 64  # weights per absmax
DOUBLE_QUANT_BLOCK = 256  # absmaxes per second-level fp32 scale


def saved_activation_bytes_per_token(shape: ModelShape, lora_rank: int, targets=ALL_TARGETS, dora: bool = False,
                                     activation_bytes: int = 2) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing); see the module docstring."""
    a = activation_bytes
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    nh, nkv = shape.num_attention_heads, shape.num_key_value_heads
    total = 2 * (4 * h + 4)  # input / post-attention RMSNorm: fp32 copy of the input + fp32 variance
    if shape.model_type == "qwen3":
        total += 4 * q + 4 * nh + 4 * kv + 4 * nkv  # q_norm / k_norm on the heads
    total += a * (2 * q + 2 * kv) + 4 * nh  # attention kernel: q, k, v, output, fp32 log-sum-exp
    total += 3 * a * i  # SwiGLU: gate (silu input), silu(gate), up
    if lora_rank:
        for t in targets:
            fan_in, fan_out = shape.linear_shapes()[t]
            total += a * (fan_in + lora_rank)  # the target's own half copy of its input, and A x
            if dora:
                total += 2 * a * fan_out  # DoRA keeps the base and the LoRA outputs for the magnitude's gradient
    return total


@dataclass
class MemoryEstimate:
    """The estimate: inputs, parameter counts, the breakdown (bytes) and verdicts per GPU."""

    model: str
    settings: dict[str, Any]
    parameters: dict[str, int]
    breakdown: dict[str, int]
    shape: ModelShape = field(repr=False, default=None)
    request: dict[str, Any] = field(repr=False, default_factory=dict)  # the keyword arguments, to re-estimate

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    def fits(self, gpu: str | float) -> bool:
        return self.total <= _capacity(gpu)

    def verdict(self, gpu: str | float) -> dict[str, Any]:
        """Fits or not on ``gpu`` (a name in :data:`GPUS` or GiB), the headroom, and the largest seq len / batch."""
        cap = _capacity(gpu)
        free = cap - self.total
        if free < 0:
            word = "OOM"
        elif free < 0.10 * cap:
            word = "tight"
        else:
            word = "fits"
        return {
            "gpu": gpu if isinstance(gpu, str) else f"{gpu} GiB",
            "capacity_gib": cap / GIB,
            "total_gib": self.total / GIB,
            "free_gib": free / GIB,
            "verdict": word,
            "max_seq_len": largest_fitting(self, cap, "seq_len"),
            "max_batch": largest_fitting(self, cap, "batch_size"),
        }

    def verdicts(self, gpus=tuple(GPUS)) -> list[dict[str, Any]]:
        return [self.verdict(g) for g in gpus]

    def as_dict(self, gpus=tuple(GPUS)) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "parameters": self.parameters,
                "breakdown_bytes": self.breakdown, "breakdown_gib": {k: v / GIB for k, v in self.breakdown.items()},
                "total_bytes": self.total, "total_gib": self.total / GIB, "verdicts": self.verdicts(gpus)}

    def table(self) -> str:
        """The breakdown as a markdown table."""
        rows = ["| part | GiB | share |", "|---|---:|---:|"]
        for k, v in self.breakdown.items():
            rows.append(f"| {k} | {v / GIB:.2f} | {100 * v / self.total:.0f} % |")
        rows.append(f"| **total** | **{self.total / GIB:.2f}** | |")
        return "\n".join(rows)


def _capacity(gpu: str | float) -> float:
    if isinstance(gpu, str):
        if gpu.lower() not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)} or give the memory in GiB")
        return GPUS[gpu.lower()] * GIB
    return float(gpu) * GIB


def estimate_training_memory(
    model: str | os.PathLike | Mapping | ModelShape | Any,
    *,
    weights: str = "nf4",
    double_quant: bool = True,
    lora_rank: int = 16,
    lora_targets=ALL_TARGETS,
    dora: bool = False,
    new_tokens: int = 0,
    vocab_size: int | None = None,
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 1024,
    gradient_checkpointing: bool = True,
    cuda_context_gib: float = 0.5,
    allocator_reserve: float = 0.05,
    loss_chunk: int | None = None,
) -> MemoryEstimate:
    """Peak GPU memory of one training step, without weights; see the module docstring for each term.

    ``loss_chunk`` = the positions per chunk of trkit's chunked loss (``trkit train --loss chunked``): the
    logits term becomes one chunk's fp32 logits (overwritten by their gradient) and their half copy for the
    matrix products, plus the fp32 gradient of the hidden states; no merged ``lm_head`` copy is kept.

    ``vocab_size`` overrides the config's (an extended vocabulary); ``new_tokens`` rows of the
    embedding (and untied ``lm_head``) are trainable through PEFT ``trainable_token_indices``.
    """
    shape = model_shape(model)
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if lora_rank < 0 or new_tokens < 0:
        raise ValueError("lora_rank and new_tokens must be >= 0")
    if lora_rank == 0 and new_tokens == 0:
        raise ValueError("nothing is trainable: set lora_rank >= 1 and/or new_tokens >= 1 (full fine-tuning is not estimated)")
    if dora and lora_rank == 0:
        raise ValueError("DoRA needs lora_rank >= 1")
    if vocab_size is not None:
        shape = dataclasses.replace(shape, vocab_size=int(vocab_size))
    targets = tuple(lora_targets) if lora_rank else ()
    if new_tokens > shape.vocab_size:
        raise ValueError(f"new_tokens ({new_tokens}) exceeds the vocabulary ({shape.vocab_size}); raise vocab_size")

    params = count_parameters(shape)
    h, v, layers = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers
    tokens = batch_size * seq_len
    half = 2

    # weights
    linear = params["decoder_linear"]
    if weights == "nf4":
        absmax = (1 + 4 / DOUBLE_QUANT_BLOCK) if double_quant else 4
        linear_bytes = linear * 0.5 + linear / NF4_BLOCK * absmax
    elif weights == "int8":
        linear_bytes = linear * 1 + 4 * layers * sum(o for _, o in shape.linear_shapes().values())
    else:
        linear_bytes = linear * half
    weight_bytes = linear_bytes + half * (params["embed_tokens"] + params["lm_head"] + params["decoder_norms"])

    # adapters (fp32) and what is trainable
    lora = lora_parameters(shape, lora_rank, targets, dora) if lora_rank else {"lora": 0, "dora_magnitude": 0, "total": 0}
    token_copies = 1 if shape.tie_word_embeddings else 2
    token_params = new_tokens * h * token_copies
    trainable = lora["total"] + token_params
    adapter_bytes = 4 * trainable + half * token_params  # + PEFT's copy of the original rows

    gradient_bytes = 4 * trainable
    if optimizer == "adamw":
        optimizer_bytes = 8 * trainable
    elif optimizer == "sophiag":
        optimizer_bytes = 8 * trainable  # exp_avg (fp32 adapters) + fp32 hessian
    else:
        optimizer_bytes = sum(_adam8bit_state_bytes(n) for n in _trainable_tensor_sizes(shape, lora_rank, targets, dora,
                                                                                        new_tokens, token_copies))

    # activations
    layer_full = saved_activation_bytes_per_token(shape, lora_rank, targets, dora) * tokens
    if gradient_checkpointing:
        acts = layers * half * h * tokens + layer_full  # layer inputs + one layer recomputed at a time
    else:
        acts = layers * layer_full
    acts += (4 * h + 4) * tokens  # final norm
    if new_tokens:
        acts += half * h * tokens  # lm_head's input, kept for the new rows' gradient
    acts += half * lora["lora"]  # autocast's half copies of the adapter weights
    if loss_chunk:
        logits_bytes = min(tokens, int(loss_chunk)) * v * (4 + half) + 4 * tokens * h
    else:
        logits_bytes = 12 * tokens * v

    # workspace: the largest transient at one layer
    largest = max(i * o for i, o in shape.linear_shapes().values())
    workspace = half * largest if weights in ("nf4", "int8") else 0
    if dora:
        workspace = max(workspace, max(6 * shape.linear_shapes()[t][0] ** 2 + 8 * shape.linear_shapes()[t][0] * shape.linear_shapes()[t][1]
                                       for t in targets))
    if new_tokens:
        # full loss: merged lm_head copy kept for backward + its dense gradient; chunked: only the input
        # embedding's transient merged copy (the head's new rows are read as a slice)
        workspace += (1 if loss_chunk else 2) * half * v * h

    breakdown = {
        "weights": int(weight_bytes),
        "adapters": int(adapter_bytes),
        "gradients": int(gradient_bytes),
        "optimizer_state": int(optimizer_bytes),
        "activations": int(acts),
        "logits": int(logits_bytes),
        "workspace": int(workspace),
        "cuda_context": int(cuda_context_gib * GIB),
    }
    breakdown["allocator_reserve"] = int(allocator_reserve * (sum(breakdown.values()) - breakdown["cuda_context"]))
    settings = dict(weights=weights, double_quant=double_quant if weights == "nf4" else None, lora_rank=lora_rank,
                    lora_targets=list(targets), dora=dora, new_tokens=new_tokens, vocab_size=v, optimizer=optimizer,
                    batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                    cuda_context_gib=cuda_context_gib, allocator_reserve=allocator_reserve, loss_chunk=loss_chunk)
    parameters = {**{k: v_ for k, v_ in params.items() if k != "per_layer"}, "lora": lora["lora"],
                  "dora_magnitude": lora["dora_magnitude"], "new_token_rows": token_params, "trainable": trainable}
    request = dict(weights=weights, double_quant=double_quant, lora_rank=lora_rank, lora_targets=targets or ALL_TARGETS,
                   dora=dora, new_tokens=new_tokens, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                   gradient_checkpointing=gradient_checkpointing, cuda_context_gib=cuda_context_gib,
                   allocator_reserve=allocator_reserve, loss_chunk=loss_chunk)
    return MemoryEstimate(model=shape.name or shape.model_type, settings=settings, parameters=parameters,
                          breakdown=breakdown, shape=shape, request=request)


def _trainable_tensor_sizes(shape, rank, targets, dora, new_tokens, token_copies) -> list[int]:
    sizes = []
    for t in targets:
        fan_in, fan_out = shape.linear_shapes()[t]
        sizes += [rank * fan_in, rank * fan_out] + ([fan_out] if dora else [])
    sizes = sizes * shape.num_hidden_layers
    if new_tokens:
        sizes += [new_tokens * shape.hidden_size] * token_copies
    return sizes


def _adam8bit_state_bytes(n: int) -> float:
    if n < BNB_MIN_8BIT_SIZE:
        return 8 * n
    return 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)


def largest_fitting(estimate: MemoryEstimate, capacity_bytes: float, knob: str) -> int:
    """Largest ``seq_len`` (a multiple of 128, up to the model's context) or ``batch_size`` (up to 512)
    that fits in ``capacity_bytes`` with every other setting unchanged; 0 if not even the smallest fits."""
    if knob not in ("seq_len", "batch_size"):
        raise ValueError(f"knob must be 'seq_len' or 'batch_size', got {knob!r}")
    step, limit = (128, estimate.shape.max_position_embeddings) if knob == "seq_len" else (1, 512)
    lo, hi = 0, limit // step  # in units of step: the largest n with a fitting n * step

    def fits(n: int) -> bool:
        return estimate_training_memory(estimate.shape, **{**estimate.request, knob: n * step}).total <= capacity_bytes

    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


# --------------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------------


@dataclass
class PhaseRecord:
    """One named phase: its time span and the peaks inside it (bytes; GPU fields 0 without CUDA)."""

    name: str
    start: float
    end: float = float("nan")
    rss_start: int = 0
    rss_end: int = 0
    peak_rss: int = 0
    peak_gpu_allocated: int = 0
    peak_gpu_reserved: int = 0
    peak_gpu_total: int = 0  # NVML (nvidia-smi) device total, includes the CUDA context and other processes
    gpu_allocated_start: int = 0
    gpu_allocated_end: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


class MemoryMonitor:
    """Samples memory on a background thread; ``phase(name)`` records each phase's peaks.

    Args:
        interval: seconds between samples.
        device: CUDA device to watch (default: the current one when CUDA is available, else none).
    """

    def __init__(self, interval: float = 0.2, device: Any = None):
        import psutil

        self.interval = float(interval)
        self._process = psutil.Process()
        self._psutil = psutil
        self._cuda = None
        try:
            import torch

            if torch.cuda.is_available():
                self._cuda = torch
                self.device = torch.device(device if device is not None else torch.cuda.current_device())
        except ImportError:
            pass
        if self._cuda is None:
            self.device = None
        self.samples: list[dict[str, Any]] = []
        self.phases: list[PhaseRecord] = []
        self._open: list[PhaseRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.perf_counter()

    # -- sampling
    def _nvml_used(self) -> int:
        try:
            return int(self._cuda.cuda.device_memory_used(self.device))
        except Exception:  # NVML missing (no driver library, MIG, ROCm without amdsmi): leave it out
            return 0

    def sample(self, label: str | None = None) -> dict[str, Any]:
        """Take one reading now (also what the thread does every ``interval``)."""
        vm = self._psutil.virtual_memory()
        s = {"t": time.perf_counter() - self.t0, "rss": self._process.memory_info().rss,
             "ram_used": vm.total - vm.available, "ram_total": vm.total}
        if self._cuda is not None:
            cuda = self._cuda.cuda
            s.update(gpu_allocated=cuda.memory_allocated(self.device), gpu_reserved=cuda.memory_reserved(self.device),
                     gpu_peak_allocated=cuda.max_memory_allocated(self.device), gpu_total=self._nvml_used())
        if label:
            s["label"] = label
        with self._lock:
            self.samples.append(s)
            for ph in self._open:
                ph.peak_rss = max(ph.peak_rss, s["rss"])
                if self._cuda is not None:
                    ph.peak_gpu_allocated = max(ph.peak_gpu_allocated, s["gpu_peak_allocated"])
                    ph.peak_gpu_reserved = max(ph.peak_gpu_reserved, s["gpu_reserved"])
                    ph.peak_gpu_total = max(ph.peak_gpu_total, s["gpu_total"])
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "MemoryMonitor":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="trkit-memory-monitor", daemon=True)
            self._thread.start()
        self.sample("start")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)
        self._thread = None
        self.sample("stop")

    def __enter__(self) -> "MemoryMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        """Record the peaks of the code inside; phases may nest (an outer phase keeps the inner peaks)."""
        first = self.sample(f"{name}: start")  # folds the peak so far into the already open phases
        if self._cuda is not None:
            self._cuda.cuda.reset_peak_memory_stats(self.device)
        record = PhaseRecord(name=name, start=first["t"], rss_start=first["rss"], peak_rss=first["rss"],
                             gpu_allocated_start=first.get("gpu_allocated", 0),
                             peak_gpu_allocated=first.get("gpu_allocated", 0), peak_gpu_reserved=first.get("gpu_reserved", 0),
                             peak_gpu_total=first.get("gpu_total", 0))
        with self._lock:
            self._open.append(record)
        try:
            yield record
        finally:
            last = self.sample(f"{name}: end")
            with self._lock:
                self._open.remove(record)
                self.phases.append(record)
            record.end, record.rss_end = last["t"], last["rss"]
            record.gpu_allocated_end = last.get("gpu_allocated", 0)

    # -- reports
    def summary(self) -> list[dict[str, Any]]:
        """One row per finished phase (GiB, seconds)."""
        rows = []
        for ph in sorted(self.phases, key=lambda p: p.start):
            row = {"phase": ph.name, "seconds": round(ph.seconds, 3), "peak_rss_gib": ph.peak_rss / GIB,
                   "rss_delta_gib": (ph.rss_end - ph.rss_start) / GIB}
            if self._cuda is not None:
                row.update(peak_gpu_allocated_gib=ph.peak_gpu_allocated / GIB, peak_gpu_reserved_gib=ph.peak_gpu_reserved / GIB,
                           peak_gpu_total_gib=ph.peak_gpu_total / GIB,
                           gpu_allocated_delta_gib=(ph.gpu_allocated_end - ph.gpu_allocated_start) / GIB)
            rows.append(row)
        return rows

    def table(self) -> str:
        """The summary as a markdown table."""
        rows = self.summary()
        if not rows:
            return "(no phases recorded)"
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" if k == "phase" else "---:" for k in keys) + "|"]
        for r in rows:
            lines.append("| " + " | ".join(str(r[k]) if k == "phase" else f"{r[k]:.3f}" for k in keys) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike | None = None):
        """Timeline of the samples with the phases shaded; saved to ``path`` (PNG) when given. Returns the figure."""
        import matplotlib

        if path is not None and not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        t = [s["t"] for s in self.samples]
        ax.plot(t, [s["rss"] / GIB for s in self.samples], label="process RSS")
        if self._cuda is not None:
            ax.plot(t, [s["gpu_allocated"] / GIB for s in self.samples], label="GPU allocated")
            ax.plot(t, [s["gpu_reserved"] / GIB for s in self.samples], label="GPU reserved")
            if any(s["gpu_total"] for s in self.samples):
                ax.plot(t, [s["gpu_total"] / GIB for s in self.samples], label="GPU total (NVML)", linestyle="--")
        for i, ph in enumerate(sorted(self.phases, key=lambda p: p.start)):
            ax.axvspan(ph.start, ph.end, alpha=0.12, color=f"C{i % 10}")
            ax.text(ph.start, ax.get_ylim()[1] * 0.97, ph.name, fontsize=8, va="top", rotation=90)
        ax.set_xlabel("seconds")
        ax.set_ylabel("GiB")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title("memory timeline")
        fig.tight_layout()
        if path is not None:
            from trkit.artifacts import atomic_path

            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device) if self.device is not None else "cpu", "interval_s": self.interval,
                "phases": self.summary(), "samples": list(self.samples)}

    def save(self, path: str | os.PathLike) -> Path:
        from trkit.artifacts import atomic_write_json

        return atomic_write_json(path, self.to_dict())


def _memory_callback_class():
    from transformers import TrainerCallback

    class MemoryCallback(TrainerCallback):
        """Writes a memory sample into ``state.log_history`` every ``every_n_steps`` optimizer steps.

        Keys: ``memory/rss_gib``, ``memory/ram_used_gib`` and, on CUDA, ``memory/gpu_allocated_gib``,
        ``memory/gpu_reserved_gib``, ``memory/gpu_peak_allocated_gib``, ``memory/gpu_total_gib``.
        The training itself runs inside a ``train`` phase of the monitor.
        """

        def __init__(self, monitor: MemoryMonitor | None = None, every_n_steps: int = 10):
            if every_n_steps < 1:
                raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
            self.monitor = monitor if monitor is not None else MemoryMonitor()
            self.every_n_steps = every_n_steps
            self._phase = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.monitor.running:
                self.monitor.start()
            self._phase = self.monitor.phase("train")
            self._phase.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % self.every_n_steps:
                return
            s = self.monitor.sample(f"step {state.global_step}")
            entry = {"step": state.global_step, "memory/rss_gib": s["rss"] / GIB, "memory/ram_used_gib": s["ram_used"] / GIB}
            for key in ("gpu_allocated", "gpu_reserved", "gpu_peak_allocated", "gpu_total"):
                if key in s:
                    entry[f"memory/{key}_gib"] = s[key] / GIB
            state.log_history.append(entry)

        def on_train_end(self, args, state, control, **kwargs):
            if self._phase is not None:
                self._phase.__exit__(None, None, None)
                self._phase = None

    return MemoryCallback


def __getattr__(name: str):
    # MemoryCallback subclasses transformers.TrainerCallback; build it on first use so that importing
    # this module (the CLI does, to build its parser) stays free of torch and transformers.
    if name == "MemoryCallback":
        cls = _memory_callback_class()
        globals()["MemoryCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit memory
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="Qwen/Qwen3-8B",
                        help=f"built-in ({', '.join(BUILTIN_SHAPES)}), a config.json or a model directory")
    parser.add_argument("--profile", default="t4", help="t4 | a100 | gpu: supplies the defaults below (default t4)")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, help="frozen base format (default: nf4 if the profile loads 4-bit, else its dtype)")
    parser.add_argument("--no-double-quant", action="store_true", help="NF4 without double quantisation")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated LoRA targets")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=0, help="trainable new-token rows (PEFT trainable_token_indices)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary after extension (default: the config's)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--batch", type=int, help="micro-batch (default: the profile's)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the profile's)")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), help="default: the profile's")
    from trkit.options import positive_int

    parser.add_argument("--loss-chunk", type=positive_int, metavar="N",
                        help="positions per chunk of trkit train's chunked loss (its default: 1024); "
                             "omit for a full-logits loss (Hugging Face Trainer, --loss full)")
    parser.add_argument("--gpus", default=",".join(GPUS), help=f"GPUs to judge against ({', '.join(GPUS)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--out", help="also write the JSON to this file")


def estimate_for_profile(model: str, profile: str = "t4", **overrides) -> MemoryEstimate:
    """:func:`estimate_training_memory` with the defaults of a trkit profile (``trkit.profiles``)."""
    from trkit.profiles import get_profile

    prof = get_profile(profile, check_hardware=False)
    if prof.device != "cuda":
        raise ValueError(f"profile {prof.name!r} is not a GPU profile; the estimator plans GPU runs: use t4, a100 or gpu")
    kwargs = dict(weights="nf4" if prof.load_in_4bit else ("fp16" if prof.dtype == "float16" else "bf16"),
                  batch_size=prof.batch_size, seq_len=prof.max_seq_len, gradient_checkpointing=prof.gradient_checkpointing)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return estimate_training_memory(model, **kwargs)


def run_cli(args) -> int:
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    for g in gpus:
        _capacity(g)
    estimate = estimate_for_profile(
        args.model, args.profile, weights=args.weights, double_quant=not args.no_double_quant, lora_rank=args.lora_rank,
        lora_targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), dora=args.dora,
        new_tokens=args.new_tokens, vocab_size=args.vocab_size, optimizer=args.optimizer, batch_size=args.batch,
        seq_len=args.seq_len, loss_chunk=args.loss_chunk,
        gradient_checkpointing=None if args.gradient_checkpointing is None else args.gradient_checkpointing == "on",
    )
    report = {"profile": args.profile, **estimate.as_dict(gpus)}
    if args.out:
        from trkit.artifacts import atomic_write_json

        atomic_write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = estimate.settings
    print(f"{estimate.model}: {estimate.parameters['total'] / 1e9:.2f}B parameters, {estimate.parameters['trainable'] / 1e6:.1f}M trainable")
    print(f"weights {s['weights']}, LoRA r={s['lora_rank']}{' DoRA' if s['dora'] else ''} on {len(s['lora_targets'])} targets, "
          f"new-token rows {s['new_tokens']}, vocab {s['vocab_size']}, {s['optimizer']}, batch {s['batch_size']} x seq {s['seq_len']}, "
          f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    print()
    print(estimate.table())
    print()
    print("| GPU | capacity GiB | free GiB | verdict | max seq len at this batch | max batch at this seq len |")
    print("|---|---:|---:|---|---:|---:|")
    for v in estimate.verdicts(gpus):
        print(f"| {v['gpu']} | {v['capacity_gib']:.0f} | {v['free_gib']:.2f} | {v['verdict']} | {v['max_seq_len']} | {v['max_batch']} |")
    print("\nan estimate (see trkit/memory.py for each term); not yet checked against measured CUDA peaks")
    return 0
