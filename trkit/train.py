"""The training stage: new-token rows and QLoRA/DoRA adapters, NEFTune, SophiaG, exact resume, scale-out.

What it does. ``python -m trkit train`` (or :func:`train` from a notebook) takes the extended
checkpoint of ``trkit embed`` and trains, on a document stream from :mod:`trkit.packing`:

* ``--stage rows``: only the new tokens' input and output rows (PEFT ``trainable_token_indices``),
  the principled first half of "progressive" vocabulary adaptation: new rows learn to fit a frozen
  model before anything else moves;
* ``--stage adapters``: LoRA / DoRA adapters on the projections **plus** the new rows, each group
  with its own learning rate (``--lr``, ``--embedding-lr``). It can start from a ``rows`` run's
  output (``--model`` = that run's directory: its rows are merged first).

Adapters: ``dora`` (trkit's memory-lean DoRA, :mod:`trkit.dora`), ``peft-dora``, ``lora`` (PEFT),
``none``. Optimizers: AdamW, 8-bit AdamW and paged 8-bit AdamW (bitsandbytes), SophiaG
(:mod:`trkit.sophia`, its Gauss-Newton-Bartlett pass every ``--hessian-every`` steps through
:class:`trkit.trainer.HessianSchedule`). Cosine schedule with linear warm-up, gradient clipping,
fp16 with a GradScaler on a T4, bf16 on an A100 (and on CPUs with AVX512-BF16). NEFTune
(:mod:`trkit.neftune`) with ``--neftune-alpha``.

The loss is cross-entropy computed by :mod:`trkit.losses` from the final hidden states in sequence
chunks (``--loss chunked``), so full-vocabulary fp32 logits never exist; ``--loss full`` is the
model's own head, for comparison. Every optimizer step averages over **all** labelled tokens of its
micro-batches (all processes included), so accumulation and data parallelism equal one big batch.

The loop is a plain PyTorch loop (nanoGPT-style, readable top to bottom) on
``accelerate.Accelerator`` for device placement and DDP, rather than the Hugging Face Trainer: that
is what makes its checkpoints atomic, pickle-free (safetensors + JSON) and **bitwise** resumable.

Checkpoints: ``OUT/checkpoint-<step>/`` every ``--save-steps`` steps and every ``--save-minutes``
minutes, keeping the last ``--keep``: ``adapter/`` (PEFT format), ``optimizer.safetensors`` +
``optimizer.json``, ``rng-<rank>.safetensors``, ``trainer_state.json`` (step, data position,
scheduler, GradScaler, Sophia schedule, RNG of Python and NumPy, config) and a manifest. A checkpoint
directory appears only complete (written under a temporary name, renamed); free disk is checked
first. ``--resume auto`` (the default) continues from the newest complete checkpoint; a run killed
with SIGKILL after checkpoint k and resumed ends with the same parameters as one never interrupted
(on CPU bitwise: optimizer state, Sophia's h, scheduler, scaler, data position, and the RNG that
drives dropout, NEFTune noise and GNB labels are all restored). A checkpoint of another config is
refused with the differing settings named.

Outputs in ``OUT/``: ``adapter/`` (``PeftModel.from_pretrained(extended_model, OUT/adapter)`` loads
it, new rows included; the tokenizer beside it), ``log.jsonl``, a model card ``README.md``,
``train_config.json``, optionally ``merged/`` (``--merge``: a full checkpoint written shard by shard,
:mod:`trkit.merge`) and a hub upload (``--push-to-hub``).

Scale-out: ``accelerate launch -m trkit train ...`` runs the same loop under DDP (``gloo`` on CPU,
NCCL on GPUs); each process takes every ``world``-th micro-batch of a step, so 2 processes with
micro-batch b equal 1 process with micro-batch b and 2 accumulation steps (tested on CPU with the
shipped ``trkit/data/accelerate_multi_gpu.yaml``). FSDP and DeepSpeed are refused before loading:
every process holds the whole model (4-bit on GPUs: Qwen3-8B fits one 16 GB card), which is what
data parallelism needs and what an 8B QLoRA run on one machine's GPUs needs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from trkit.embeddings import Extension, _is_tied, new_token_ids

if TYPE_CHECKING:  # pragma: no cover
    import torch

STAGES = ("rows", "adapters")
ADAPTERS = ("dora", "peft-dora", "lora", "none")
OPTIMIZERS = ("auto", "adamw", "adamw8bit", "paged_adamw8bit", "sophia")
LOSSES = ("chunked", "full")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
ADAPTER_DIR = "adapter"
TOKEN_DELTA = "trainable_tokens_delta"
# Settings that do not change what is trained: they may differ between a run and its resumption.
OPERATIONAL = {"out", "resume", "save_steps", "save_minutes", "keep", "eval_steps", "eval_chars", "logging_steps",
               "progress", "merge", "push_to_hub", "overwrite", "profile", "quiet"}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on; the CLI flags map one to one (``--max-steps`` = max_steps).

    ``None`` means "the profile's default" (batch size, sequence length, accumulation, optimizer).
    """

    model: str
    out: str
    corpus: list[str] = field(default_factory=lambda: ["default"])
    stage: str = "adapters"
    format: str = "text"
    text_field: str = "text"
    max_documents: int | None = None
    tokenizer: str | None = None
    adapter: str = "dora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    rslora: bool = False
    lr: float = 2e-4
    embedding_lr: float | None = None  # default: 1e-3 for --stage rows, lr/2 for --stage adapters
    embedding_eps: float | None = None  # Adam's eps for the new rows; default: ROW_EPS_FRACTION x one occurrence's gradient
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default: 5% of max_steps
    max_grad_norm: float = 1.0
    optimizer: str = "auto"
    rho: float = 0.04
    hessian_every: int = 10
    max_steps: int = 100
    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    seed: int = 0
    neftune_alpha: float = 0.0
    loss: str = "chunked"
    loss_chunk: int = 1024
    save_steps: int = 50
    save_minutes: float = 10.0
    keep: int = 2
    resume: str = "auto"
    eval_steps: int = 0  # 0: only before the first and after the last step
    eval_chars: int = 20_000
    logging_steps: int = 1
    profile: str = "auto"
    dtype: str | None = None
    gradient_checkpointing: bool | None = None  # default: the profile's (on for GPUs)
    merge: bool = False
    push_to_hub: str | None = None
    overwrite: bool = False
    progress: bool = True
    distill: str | None = None
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    kd_mode: str = "rest"  # trkit.distill.KD_MODES: rest | renormalized | uld
    kd_chain_weight: float = 0.0

    def resolved(self, profile) -> "TrainConfig":
        """A copy with the profile's defaults filled in (batch, sequence length, accumulation, optimizer)."""
        c = dataclasses.replace(self)
        c.batch_size = c.batch_size or profile.batch_size
        c.seq_len = c.seq_len or profile.max_seq_len
        c.grad_accum = c.grad_accum or (profile.grad_accum if profile.device == "cuda" else 1)
        c.dtype = c.dtype or profile.dtype
        if c.optimizer == "auto":
            # fp32 AdamW states of 20k new rows do not fit a T4 next to Qwen3-8B (trkit.memory): 8-bit there
            c.optimizer = "adamw8bit" if profile.name == "t4" else "adamw"
        if c.embedding_lr is None:
            c.embedding_lr = 1e-3 if c.stage == "rows" else c.lr / 2
        if c.warmup_steps is None:
            c.warmup_steps = max(1, round(0.05 * c.max_steps))
        return c

    def validate(self) -> None:
        """Refuse settings that make no sense, with the flag to change, before anything is loaded."""
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"--adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.format not in ("text", "chat"):
            raise ValueError(f"--format must be text or chat, got {self.format!r}")
        if self.stage == "adapters" and self.adapter == "none":
            raise ValueError("--stage adapters with --adapter none trains nothing but rows: use --stage rows")
        for name in ("max_steps", "rank", "hessian_every", "keep", "loss_chunk", "logging_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_documents"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError("--seq-len must be >= 2 (a block predicts seq_len - 1 tokens)")
        for name in ("lr", "alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.embedding_lr is not None and not self.embedding_lr > 0:
            raise ValueError(f"--embedding-lr must be > 0, got {self.embedding_lr}")
        if self.embedding_eps is not None and not self.embedding_eps > 0:
            raise ValueError(f"--embedding-eps must be > 0, got {self.embedding_eps}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("weight_decay", "max_grad_norm", "neftune_alpha", "rho", "save_minutes", "kd_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise ValueError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.kd_mode not in ("rest", "renormalized", "uld"):
            raise ValueError(f"--kd-mode must be rest, renormalized or uld, got {self.kd_mode!r}")
        if self.kd_chain_weight < 0:
            raise ValueError(f"--kd-chain-weight must be >= 0, got {self.kd_chain_weight}")
        if self.distill and self.loss == "full":
            raise ValueError("--distill needs --loss chunked (the KD loss is computed from hidden states in chunks)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"--warmup-steps must be in [0, --max-steps], got {self.warmup_steps}")
        for name in ("save_steps", "eval_steps", "eval_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.targets and self.stage == "adapters":
            raise ValueError("--targets is empty: name the projections to adapt, e.g. q_proj,v_proj")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"--resume must be auto, never or a checkpoint directory; {self.resume} is none")

    def identity(self) -> dict:
        """The settings that determine the trained parameters (compared on resume)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in OPERATIONAL}


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# What is new in the vocabulary
# --------------------------------------------------------------------------------------------


def new_token_range(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> tuple[int, int] | None:
    """``(first new id, vocabulary size)`` of an extended checkpoint (``trkit embed``'s manifest, or the
    ``trkit vocab`` manifest of its tokenizer), or None when the model has no new rows."""
    from trkit.artifacts import MANIFEST_NAME

    for d in (tokenizer_dir, model_dir):
        if d is None:
            continue
        path = Path(d) / MANIFEST_NAME
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("stage") in ("embed", "vocab") and "base_vocab_size" in manifest:
                base = int(manifest["base_vocab_size"])
                size = int(manifest.get("vocab_size") or base + len(manifest.get("new_tokens", [])))
                if size > base:
                    return base, size
    return None


def trainable_token_indices(model, ext: Extension | str | os.PathLike | Sequence[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` for the new ids, input **and** output rows.

    Untied models get both ``embed_tokens`` and ``lm_head``; a tied model gets ``embed_tokens`` only
    (PEFT ties the output adapter to it). Use it in ``LoraConfig(trainable_token_indices=...)`` or
    ``TrainableTokensConfig`` (see ``new_rows_peft_config``).
    """
    ids = list(ext) if isinstance(ext, (list, tuple, range)) else new_token_ids(ext)
    in_name = _module_name(model, model.get_input_embeddings())
    out = {in_name: ids}
    head = model.get_output_embeddings()
    if head is not None and not _is_tied(model):
        out[_module_name(model, head)] = ids
    return out


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def new_rows_peft_config(model, ext, **lora_kwargs):
    """A PEFT config that trains only the new rows (``TrainableTokensConfig``), or with ``lora_kwargs``
    a ``LoraConfig`` whose ``trainable_token_indices`` trains them beside the adapters."""
    from peft import LoraConfig, TrainableTokensConfig

    indices = trainable_token_indices(model, ext)
    if lora_kwargs:
        return LoraConfig(trainable_token_indices=indices, **lora_kwargs)
    ids = next(iter(indices.values()))
    return TrainableTokensConfig(target_modules=list(indices), token_indices=ids)


def new_rows_param_groups(model, lr: float, embedding_lr: float | None = None, embedding_lr_ratio: float = 0.2,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: PEFT's trainable token rows get their own learning rate and no weight
    decay (it would pull them to zero, not to their initialisation); everything else trainable gets ``lr``."""
    rows, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rows if TOKEN_DELTA in name else rest).append(p)
    groups = []
    if rows:
        groups.append({"params": rows, "lr": embedding_lr if embedding_lr is not None else lr * embedding_lr_ratio,
                       "weight_decay": 0.0, "name": "new_token_rows"})
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "adapters"})
    if not groups:
        raise ValueError("nothing to train: the model has no trainable parameters")
    return groups


# --------------------------------------------------------------------------------------------
# Building the trainable model
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    model: Any  # what the optimizer trains and what is saved (a PeftModel, or a model with trkit DoRA layers)
    causal: Any  # the causal LM inside it
    tokenizer: Any
    source: Path  # the extended checkpoint the adapter belongs to
    new_ids: list[int]
    adapter_kind: str
    peft: bool
    start_adapter: str | None = None  # a rows run whose adapter was merged first


def _causal_of(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def build_model(config: TrainConfig, profile) -> Built:
    """Load the extended model for training and attach the trainable parts the config asks for."""
    import torch
    from peft import PeftModel, get_peft_model

    from trkit import dora as trkit_dora
    from trkit.loading import load_model

    source, start_adapter = _source_of(config.model)
    model, tok = load_model(source, profile, tokenizer=config.tokenizer, dtype=config.dtype, training=True,
                            gradient_checkpointing=config.gradient_checkpointing)
    if start_adapter is not None:  # a rows run's output: merge its rows (and anything else) into the model
        model = PeftModel.from_pretrained(model, str(start_adapter)).merge_and_unload()
        model.train()
    span = new_token_range(source, config.tokenizer)
    new_ids = list(range(*span)) if span else []
    if config.stage == "rows" and not new_ids:
        raise ValueError(f"--stage rows trains new-token rows, but {source} has none (no `trkit embed` / `trkit vocab` "
                         "manifest with new tokens): extend it first with `python -m trkit embed`, or use "
                         "--stage adapters")
    if new_ids and new_ids[-1] >= model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"the model has {model.get_input_embeddings().weight.shape[0]} rows but new ids reach "
                         f"{new_ids[-1]}: the model and its tokenizer do not belong together")
    kind = config.adapter if config.stage == "adapters" else "none"
    peft = False
    if kind in ("lora", "peft-dora"):
        from peft import LoraConfig

        kwargs = dict(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
                      target_modules=list(config.targets), use_dora=kind == "peft-dora", bias="none",
                      task_type="CAUSAL_LM")
        if new_ids:
            kwargs["trainable_token_indices"] = trainable_token_indices(model, new_ids)
        model = get_peft_model(model, LoraConfig(**kwargs))
        peft = True
    else:
        if kind == "dora":
            trkit_dora.apply_dora(model, list(config.targets), r=config.rank, alpha=config.alpha,
                                  dropout=config.dropout, use_rslora=config.rslora)
        if new_ids:
            model = get_peft_model(model, new_rows_peft_config(model, new_ids))
            peft = True
            if kind == "dora":  # get_peft_model froze everything that is not its own: DoRA trains too
                for module in trkit_dora.dora_layers(model).values():
                    for p in (module.lora_A.weight, module.lora_B.weight, module.lora_magnitude_vector):
                        p.requires_grad_(True)
    for name, p in model.named_parameters():
        if p.requires_grad and TOKEN_DELTA in name and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master copies of the rows (the frozen model may be fp16/bf16)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train with these settings")
    return Built(model=model, causal=_causal_of(model), tokenizer=tok, source=Path(source), new_ids=new_ids,
                 adapter_kind=kind, peft=peft, start_adapter=str(start_adapter) if start_adapter else None)


def _source_of(model: str) -> tuple[str, Path | None]:
    """``(checkpoint, adapter to merge first)``: a train output directory starts from its model + adapter."""
    from trkit.artifacts import MANIFEST_NAME

    path = Path(model)
    manifest = path / MANIFEST_NAME
    if path.is_dir() and manifest.is_file():
        m = json.loads(manifest.read_text(encoding="utf-8"))
        if m.get("stage") == "train":
            return m["model"], path / ADAPTER_DIR
    return model, None


# --------------------------------------------------------------------------------------------
# Adapter files (PEFT format) and loading them back exactly
# --------------------------------------------------------------------------------------------


def _peft_key(name: str, peft: bool, lora_config: bool) -> str:
    """A trainable parameter's key in PEFT's adapter file."""
    key = name if peft else "base_model.model." + name
    key = key.replace(".default.weight", ".weight").replace(".default", "")
    key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    if lora_config and TOKEN_DELTA in key and ".token_adapter." not in key:
        key = key.replace("." + TOKEN_DELTA, ".token_adapter." + TOKEN_DELTA)
    return key


def adapter_config(built: Built, config: TrainConfig) -> dict:
    """``adapter_config.json`` as PEFT writes it for this model."""
    from peft import LoraConfig

    if built.adapter_kind in ("lora", "peft-dora") or (built.peft and built.adapter_kind == "none"):
        cfg = built.model.peft_config["default"]
    else:
        kwargs = dict(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
                      target_modules=list(config.targets), use_dora=True, bias="none", task_type="CAUSAL_LM")
        if built.new_ids:
            kwargs["trainable_token_indices"] = trainable_token_indices(built.causal, built.new_ids)
        cfg = LoraConfig(**kwargs)
    d = cfg.to_dict()
    d["base_model_name_or_path"] = str(built.source)
    d["inference_mode"] = True
    for k, v in d.items():
        if isinstance(v, set):
            d[k] = sorted(v)
    return d


def _lora_layout(built: Built) -> bool:
    """True when the file uses LoRA's key layout (trainable tokens under ``token_adapter``)."""
    return built.adapter_kind != "none"


def trainable_state(built: Built) -> dict[str, "torch.Tensor"]:
    """Every trainable tensor under its PEFT adapter-file key."""
    lora = _lora_layout(built)
    return {_peft_key(n, built.peft, lora): p.detach() for n, p in built.model.named_parameters() if p.requires_grad}


def save_adapter_files(built: Built, config: TrainConfig, directory: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory`` (a staging directory)."""
    from safetensors.torch import save_file

    from trkit.artifacts import atomic_write_json

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "adapter_config.json", adapter_config(built, config))
    tensors = {k: v.contiguous().cpu().clone() for k, v in trainable_state(built).items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter_files(built: Built, directory: Path) -> None:
    """Copy an adapter file's tensors into the trainable parameters, refusing any mismatch."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    lora = _lora_layout(built)
    params = {_peft_key(n, built.peft, lora): p for n, p in built.model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{directory} does not fit this model and config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): it was written by a run with other adapter settings")
    with torch.no_grad():
        for key, p in params.items():
            if tensors[key].shape != p.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(tensors[key].shape)}, the model {tuple(p.shape)}")
            p.copy_(tensors[key].to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------
# Optimizer, schedule, state files
# --------------------------------------------------------------------------------------------


ROW_EPS_FRACTION = 0.5


def row_eps(causal, batch: dict, labels_per_step: int, autocast=contextlib.nullcontext) -> float:
    """AdamW's ``eps`` for the new rows: ``ROW_EPS_FRACTION * rms(h) / N``.

    Why. The gradient of output row ``w`` over a step of ``N`` labelled positions is
    ``(1/N) sum_t (p_w(t) - [y_t = w]) h_t``. A row whose token is not in the step still gets the tiny
    push-down ``p_w h``, and Adam divides every coordinate by its own running RMS, so with the usual
    ``eps = 1e-8`` that tiny push is turned into a full ``lr``-sized step: every one of 20,000 new rows
    moves down along the mean hidden state each step (measured on SmolLM2 + 20k: 12 rows steps lowered
    the new rows' logits by 2.0 nats on average, and 40 steps made validation BPC 6% *worse*). One
    occurrence of a token gives its row a gradient of about ``rms(h) / N`` per coordinate, so an
    ``eps`` of half that leaves rows that are in the step on Adam's normalised steps and treats a row
    that is absent as plain gradient descent (step ``lr * g / eps``, proportional to its true gradient).
    Measured (40 rows steps, lr 1e-3, SmolLM2 + 20k, eps 1e-8 / 1e-5 / 1e-4 / 1e-3 / 1e-2, where
    ``rms(h) / N`` was 2.0e-3): Turkish BPC +6.1% / +1.6% / -1.2% / -1.9% / -0.9% against the start.

    ``rms(h)`` is measured on ``batch`` (the step's first micro-batch: the same on every process) at
    the positions that predict a label, in eval mode, before any update; ``N`` is the step's label count.
    """
    import torch

    was_training = causal.training
    causal.eval()
    try:
        with torch.no_grad(), autocast():
            hidden = causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).last_hidden_state
    finally:
        causal.train(was_training)
    keep = batch["labels"][:, 1:] != -100
    h = hidden[:, :-1][keep].float()
    if h.numel() == 0:
        raise ValueError("the first training batch has no labelled positions")
    return ROW_EPS_FRACTION * float(h.pow(2).mean().sqrt()) / max(1, labels_per_step)


def make_optimizer(built: Built, config: TrainConfig, device_type: str, rows_eps: float | None = None):
    """The optimizer over the trainable parameters; ``rows_eps`` (AdamW / 8-bit AdamW) is the new rows'
    ``eps`` (see :func:`row_eps`). SophiaG keeps the paper's update (it has no eps; its clipped steps on the
    rows were not measured here)."""
    groups = new_rows_param_groups(built.model, config.lr, config.embedding_lr, weight_decay=config.weight_decay)
    if rows_eps is not None and config.optimizer != "sophia":
        for g in groups:
            if g["name"] == "new_token_rows":
                g["eps"] = float(rows_eps)
    if config.optimizer == "adamw":
        import torch

        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=config.weight_decay)
    if config.optimizer in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        if config.optimizer == "paged_adamw8bit":
            if device_type != "cuda":
                raise ValueError("--optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and needs "
                                 "CUDA; on CPU use adamw8bit or adamw")
            return bnb.optim.PagedAdamW8bit(groups, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    from trkit.sophia import SophiaG

    return SophiaG(groups, lr=config.lr, rho=config.rho, weight_decay=config.weight_decay)


def _group_settings(optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (lr, eps, betas, ...) as plain JSON values."""
    plain = (int, float, bool, str, type(None))
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
             if k != "params" and (isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)))}
            for g in optimizer.param_groups]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total`` (step = finished steps)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_lr(optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


def _encode(value, key: str, tensors: dict):
    """JSON for a state value, tensors moved into ``tensors`` under ``key`` (nested dicts: bitsandbytes)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        ptrs = tensors.setdefault("__ptrs__", set())
        if t.untyped_storage().data_ptr() in ptrs:  # bitsandbytes shares its quantisation maps between tensors
            t = t.clone()
        ptrs.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (int, float, bool, str)) or value is None:
        return {"value": value}
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, bool, str)) or v is None for v in value):
        return {"value": list(value)}
    raise TypeError(f"optimizer state holds a {type(value).__name__} at {key}; trkit saves tensors, dicts and plain values")


def _decode(entry: dict, tensors: dict):
    if "tensor" in entry:
        return tensors[entry["tensor"]]
    if "dict" in entry:
        return {k: _decode(v, tensors) for k, v in entry["dict"].items()}
    return entry["value"]


def optimizer_state_files(optimizer) -> tuple[dict, dict]:
    """``(tensors for safetensors, everything else as JSON)`` of ``optimizer.state_dict()`` (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict = {}
    meta = {"param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                             for g in sd["param_groups"]],
            "state": {str(idx): {str(k): _encode(v, f"state.{idx}.{k}", tensors) for k, v in st.items()}
                      for idx, st in sd["state"].items()}}
    tensors.pop("__ptrs__", None)
    return tensors, meta


def load_optimizer_state(optimizer, tensors: dict, meta: dict) -> None:
    groups = [{k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    state = {int(idx): {k: _decode(v, tensors) for k, v in entry.items()} for idx, entry in meta["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict, dict]:
    """``(tensors, JSON)``: torch CPU (+ CUDA) generators, Python's and NumPy's global RNG."""
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    npy = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# --------------------------------------------------------------------------------------------
# The step's loss (one module, so DDP sees the whole forward)
# --------------------------------------------------------------------------------------------


class StepLoss:
    """Builds the ``torch.nn.Module`` whose forward returns the summed loss of a micro-batch."""

    @staticmethod
    def module(causal, model, loss: str, chunk: int, kd=None):
        import torch
        from torch import nn

        from trkit import losses

        class _Loss(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model  # registered, so DDP and .parameters() see the trainable tensors

            def forward(self, input_ids, attention_mask, labels, block_index=None, mode: str = "train",
                        generator: torch.Generator | None = None):
                if loss == "full":
                    logits = causal(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    if mode == "gnb":
                        return _gnb_from_logits(logits, labels, generator)
                    total, n = losses.full_cross_entropy(logits, labels)
                    return total, n, {}
                hidden = causal.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
                parts = losses.head_parts(causal)
                if mode == "gnb":
                    return losses.chunked_gnb_loss(hidden, parts, labels, generator, chunk) + ({},)
                if kd is not None:
                    return kd.loss(hidden, parts, labels, block_index, chunk)
                total, n = losses.chunked_cross_entropy(hidden, parts, labels, chunk)
                return total, n, {}

        return _Loss()


def _gnb_from_logits(logits, labels, generator):
    import torch

    nxt = labels[:, 1:]
    keep = nxt != -100
    z = logits[:, :-1][keep].float()
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(z.detach(), -1), 1, generator=generator).squeeze(-1)
    return torch.nn.functional.cross_entropy(z, sampled, reduction="sum"), int(keep.sum()), {}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run directory, oldest first."""
    found = []
    for p in out.glob(CHECKPOINT_PREFIX + "*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / STATE_NAME).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def newest_valid_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose files all match their manifest; damaged ones are named and skipped."""
    from trkit.artifacts import read_manifest

    for _, path in reversed(list_checkpoints(out)):
        try:
            read_manifest(path, verify=True)
            return path
        except (ValueError, FileNotFoundError) as exc:
            print(f"[trkit train] skipping damaged checkpoint {path.name}: {exc}", file=sys.stderr)
    return None


def _checkpoint_bytes(built: Built, optimizer) -> int:
    n = sum(p.numel() * 4 for p in built.model.parameters() if p.requires_grad)
    for st in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel"))
    return n


def check_free_disk(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.2 + (64 << 20):
        raise RuntimeError(f"not enough free disk for a checkpoint in {directory}: need about {needed / 2**20:.0f} MiB, "
                           f"{free / 2**20:.0f} MiB free. Free space (on Colab: empty Drive's trash) or lower --keep")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    out: Path
    steps: int
    log: list[dict]
    adapter: Path
    seconds: float
    resumed_from: int | None = None
    merged: Path | None = None


def _micro_blocks(m: int, batch: int, n_blocks: int, seed: int) -> list[int]:
    """Block indices of global micro-batch ``m``: the epoch order of (seed, epoch), consumed in turn."""
    from trkit.packing import epoch_order

    out, q = [], m * batch
    cache: dict[int, np.ndarray] = {}
    for k in range(batch):
        pos = q + k
        epoch, at = divmod(pos, n_blocks)
        if epoch not in cache:
            cache[epoch] = epoch_order(n_blocks, seed, epoch)
        out.append(int(cache[epoch][at]))
    return out


def _eval_docs(config: TrainConfig) -> dict[str, list[str]]:
    """Turkish held-out text and English text for the validation BPC (``eval_chars`` of each)."""
    from trkit import assets
    from trkit.evaluation import read_documents

    def sample(docs: list[str]) -> list[str]:
        out, n = [], 0
        for d in docs:
            if n >= config.eval_chars:
                break
            out.append(d)
            n += len(d)
        return out

    turkish = None
    if config.corpus != ["default"] and len(config.corpus) == 1 and Path(config.corpus[0]).is_dir():
        from trkit.packing import document_stream

        held = document_stream(config.corpus, seed=0, split="validation").texts
        turkish = held or None
    if turkish is None:
        turkish = read_documents(assets.validation_file())
    return {"turkish": sample(turkish), "english": sample(read_documents(assets.english_file()))}


def evaluate_bpc(model, tokenizer, docs: dict[str, list[str]], batch_size: int = 8) -> dict[str, float]:
    """Bits per character of each text (trkit.evaluation), model left in its previous mode."""
    from trkit.evaluation import score_documents

    return {name: score_documents(model, tokenizer, d, batch_size=batch_size, progress=False,
                                  max_length=min(1024, getattr(model.config, "max_position_embeddings", 1024))).bits_per_char
            for name, d in docs.items() if d}


def train(config: TrainConfig, on_log: Callable[[dict], None] | None = None) -> RunResult:
    """Run (or resume) one training run; see the module docstring. Returns where everything went.

    ``on_log(record)`` is called on the main process with every log record (a notebook's live plot)."""
    import torch
    from accelerate import Accelerator
    from trkit.progress import tqdm

    from trkit import artifacts
    from trkit.loading import preflight
    from trkit.memory import GIB
    from trkit.options import check_output
    from trkit.packing import document_stream, pack
    from trkit.profiles import get_profile, seed_everything

    import warnings

    # PEFT 0.21 asks transformers 5 for the deprecated name on every wrap; nothing for the user to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    t_start = time.perf_counter()
    config.validate()
    profile = get_profile(config.profile)
    cfg = config.resolved(profile)
    cfg.validate()
    out = Path(cfg.out)
    corpus_paths = [c for c in cfg.corpus if c != "default"]
    check_output(out, inputs=[cfg.model, cfg.tokenizer, *corpus_paths, cfg.distill], overwrite=True,
                 require_manifest=False)
    existing = list_checkpoints(out) if out.is_dir() else []
    if out.is_dir() and any(out.iterdir()):
        marker = out / CONFIG_NAME
        if not marker.is_file():
            raise ValueError(f"--out {out} exists and is not a trkit train directory (no {CONFIG_NAME}): refusing to "
                             "write into it; choose another --out")
        if cfg.overwrite:
            if existing or (out / ADAPTER_DIR).exists():
                for _, p in existing:
                    shutil.rmtree(p)
                for name in (ADAPTER_DIR, "merged", LOG_NAME, "README.md", artifacts.MANIFEST_NAME):
                    target = out / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            existing = []
        elif cfg.resume == "never":
            raise FileExistsError(f"--out {out} holds an earlier run; pass --resume auto to continue it or --overwrite "
                                  "to start again")
    accelerator = Accelerator(cpu=profile.device == "cpu")
    check_distributed_type(str(accelerator.distributed_type))
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    device = accelerator.device

    # Refusals and the memory pre-flight, before the model is loaded
    span = new_token_range(_source_of(cfg.model)[0], cfg.tokenizer)
    if cfg.stage == "rows" and not span:
        raise ValueError(f"--stage rows trains new-token rows, but {cfg.model} has none: extend it first with "
                         "`python -m trkit embed`, or use --stage adapters")
    report = preflight(_source_of(cfg.model)[0], profile, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       gradient_checkpointing=cfg.gradient_checkpointing,
                       lora_rank=cfg.rank if cfg.stage == "adapters" else 0,
                       new_tokens=(span[1] - span[0]) if span else 0,
                       optimizer=cfg.optimizer, dora=cfg.stage == "adapters" and cfg.adapter in ("dora", "peft-dora"),
                       loss_chunk=cfg.loss_chunk if cfg.loss == "chunked" else None)

    seed_everything(cfg.seed)
    built = build_model(cfg, profile)
    docs = document_stream(cfg.corpus, seed=cfg.seed, kind=cfg.format, text_field=cfg.text_field,
                           max_documents=cfg.max_documents)
    if len(docs) == 0:
        raise ValueError(f"the corpus {cfg.corpus} holds no documents")
    packed = pack(built.tokenizer, docs, cfg.seq_len, progress=cfg.progress and main)
    identity = {**cfg.identity(), "model_source": str(built.source), "documents_sha256": docs.sha256,
                "world_batch": cfg.batch_size * cfg.grad_accum * world}
    identity_hash = config_hash(identity)
    kd = None
    if cfg.distill:
        from trkit.distill import DistillLoss

        kd = DistillLoss.from_cache(cfg.distill, built, docs, packed, cfg)

    use_fp16 = cfg.dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16) if use_fp16 else None
    autocast_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    rows_eps = cfg.embedding_eps
    if rows_eps is None and built.new_ids and cfg.optimizer != "sophia":
        # measured on the first global micro-batch, so every process (and a resumed run) gets the same value
        first_blocks = _micro_blocks(0, cfg.batch_size, len(packed), cfg.seed)
        first_step_labels = sum(packed.label_count(_micro_blocks(m, cfg.batch_size, len(packed), cfg.seed))
                                for m in range(cfg.grad_accum * world))
        rows_eps = row_eps(built.causal, {k: v.to(device) for k, v in packed.batch(first_blocks).items()},
                           first_step_labels, autocast)
    optimizer = make_optimizer(built, cfg, device.type, rows_eps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    schedule = None
    if cfg.optimizer == "sophia":
        from trkit.trainer import HessianSchedule

        schedule = HessianSchedule(optimizer, k=cfg.hessian_every, seed=cfg.seed)
    neftune = None
    if cfg.neftune_alpha > 0:
        from trkit.neftune import NEFTune

        neftune = NEFTune(built.causal.get_decoder(), cfg.neftune_alpha)
    loss_module = StepLoss.module(built.causal, built.model, cfg.loss, cfg.loss_chunk, kd)
    step_module = accelerator.prepare(loss_module) if world > 1 else loss_module

    # Resume
    start_step, resumed_from, log_history = 0, None, []
    ckpt = None
    if cfg.resume not in ("never",) and (existing or cfg.resume not in ("auto",)):
        ckpt = Path(cfg.resume) if cfg.resume not in ("auto",) else newest_valid_checkpoint(out)
    if ckpt is not None:
        state = json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8"))
        if state["config_hash"] != identity_hash:
            theirs = state.get("identity", {})
            diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
            raise ValueError(f"{ckpt} was written by a run with other settings ({', '.join(diff) or 'unknown'} differ): "
                             "resume it with its own settings, or use another --out (or --overwrite to start over)")
        from safetensors.torch import load_file

        load_adapter_files(built, ckpt / ADAPTER_DIR)
        load_optimizer_state(optimizer, load_file(str(ckpt / "optimizer.safetensors")),
                             json.loads((ckpt / "optimizer.json").read_text(encoding="utf-8")))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if schedule is not None and state.get("sophia"):
            schedule._last_step = state["sophia"].get("last_step")
            schedule._seed_pending = state["sophia"].get("seed_pending", False)
        rng_file = ckpt / f"rng-{rank}.safetensors"
        if rng_file.is_file() and state.get("world") == world:
            set_rng_state(load_file(str(rng_file)), state["rng"][str(rank)])
        else:
            print(f"[trkit train] {ckpt.name}: no RNG state for rank {rank} of {world}: dropout/NEFTune noise will "
                  "differ from an uninterrupted run", file=sys.stderr)
        start_step = int(state["global_step"])
        resumed_from = start_step
        log_history = [r for r in _read_log(out) if r.get("step", 0) <= start_step]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_json(out / CONFIG_NAME, {"config": dataclasses.asdict(cfg), "identity": identity,
                                                        "config_hash": identity_hash, "preflight": report,
                                                        "data": packed.stats,
                                                        "optimizer_groups": _group_settings(optimizer)})
        artifacts.sweep_stale(out, None)
        _write_log(out, log_history)
    accelerator.wait_for_everyone()

    eval_docs = _eval_docs(cfg) if main and cfg.eval_chars else {}
    micro_per_step = cfg.grad_accum * world
    n_blocks = len(packed)
    last_save = time.monotonic()
    done_steps = start_step
    if start_step >= cfg.max_steps and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        if main:
            print(f"[trkit train] {out} is already trained to step {start_step}: nothing to do", file=sys.stderr)
        return RunResult(out, start_step, _read_log(out), out / ADAPTER_DIR, time.perf_counter() - t_start,
                         resumed_from)

    def log(record: dict) -> None:
        log_history.append(record)
        if main:
            with open(out / LOG_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
            if on_log is not None:
                on_log(record)

    def do_eval(step: int) -> None:
        if not eval_docs:
            return
        if main:
            built.model.eval()
            scores = evaluate_bpc(built.model, built.tokenizer, eval_docs)
            built.model.train()
            log({"step": step, **{f"eval/{k}_bpc": v for k, v in scores.items()}})
        accelerator.wait_for_everyone()

    def save(step: int) -> None:
        nonlocal last_save
        tensors, rng_meta = rng_state()
        mine = [(rank, {k: v.tolist() for k, v in tensors.items()}, rng_meta)]
        if world > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        gathered = mine
        if main:
            from safetensors.torch import save_file

            check_free_disk(out, _checkpoint_bytes(built, optimizer))
            path = out / f"{CHECKPOINT_PREFIX}{step}"
            with artifacts.atomic_directory(path, overwrite=True) as tmp:
                save_adapter_files(built, cfg, tmp / ADAPTER_DIR)
                opt_tensors, opt_meta = optimizer_state_files(optimizer)
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                artifacts.atomic_write_json(tmp / "optimizer.json", opt_meta)
                rng_json = {}
                for r, tens, meta in gathered:
                    save_file({k: torch.tensor(v, dtype=torch.uint8) for k, v in tens.items()},
                              str(tmp / f"rng-{r}.safetensors"))
                    rng_json[str(r)] = meta
                state = {"global_step": step, "micro_batches_done": step * micro_per_step, "world": world,
                         "config_hash": identity_hash, "identity": identity, "rng": rng_json,
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "sophia": None if schedule is None else {"last_step": schedule._last_step,
                                                                  "seed_pending": schedule._seed_pending},
                         "log_history_len": len(log_history)}
                artifacts.atomic_write_json(tmp / STATE_NAME, state)
                artifacts.write_manifest(tmp, "train-checkpoint", step=step, config_hash=identity_hash)
            for s, old in list_checkpoints(out)[: -cfg.keep]:
                trash = old.with_name(f".{old.name}.{artifacts._tag()}.{int(time.time())}.old")
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
        accelerator.wait_for_everyone()
        last_save = time.monotonic()

    if start_step == 0:
        do_eval(0)
    built.model.train()
    tokens_per_step = micro_per_step * cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not (cfg.progress and main),
               dynamic_ncols=True, mininterval=1.0)
    time_window, tok_window = 0.0, 0
    for step in range(start_step, cfg.max_steps):
        t_step = time.perf_counter()
        micro = [step * micro_per_step + k for k in range(micro_per_step)]
        mine = [m for k, m in enumerate(micro) if k % world == rank]
        all_blocks = [_micro_blocks(m, cfg.batch_size, n_blocks, cfg.seed) for m in micro]
        step_labels = sum(packed.label_count(b) for b in all_blocks)
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps)
        _set_lr(optimizer, base_lrs, factor)
        gnb = None
        if schedule is not None and schedule.due(step):
            first = {k: v.to(device) for k, v in packed.batch(_micro_blocks(mine[0], cfg.batch_size, n_blocks, cfg.seed)).items()}

            def gnb_loss(model, inputs, generator):
                total, n, _ = step_module(**inputs, mode="gnb", generator=generator)
                return total / max(1, n), n * world

            gnb = schedule.maybe_update(step_module, first, step, scaler=scaler, forward_context=autocast, loss_fn=gnb_loss)
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        extras: dict[str, float] = {}
        for j, m in enumerate(mine):
            batch = {k: v.to(device) for k, v in packed.batch(_micro_blocks(m, cfg.batch_size, n_blocks, cfg.seed)).items()}
            sync = contextlib.nullcontext() if (j == len(mine) - 1 or world == 1) else accelerator.no_sync(step_module)
            with sync:
                with autocast():
                    loss_sum, _, terms = step_module(**batch)
                scaled = loss_sum * (world / step_labels)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total_loss += loss_sum.detach().double()
            for k, v in terms.items():
                extras[k] = extras.get(k, 0.0) + float(v)
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else float("nan")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done_steps = step + 1
        if world > 1:
            total_loss = accelerator.reduce(total_loss, reduction="sum")
        tok_window += tokens_per_step
        time_window += time.perf_counter() - t_step
        if done_steps % cfg.logging_steps == 0 or done_steps == cfg.max_steps:
            record = {"step": done_steps, "loss": float(total_loss) / step_labels,
                      "lr": base_lrs[-1] * factor, "grad_norm": grad_norm, "tokens_per_s": tok_window / max(time_window, 1e-9),
                      "memory_gib": _memory_gib(device), "time": time.perf_counter() - t_start}
            if len(base_lrs) > 1:
                record["embedding_lr"] = base_lrs[0] * factor
            if scaler is not None:
                record["loss_scale"] = float(scaler.get_scale())
            if gnb is not None or (schedule is not None and schedule.history):
                record.update({k: v for k, v in schedule.log_dict().items() if v == v})
            for k, v in extras.items():
                record[k] = v / step_labels
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mem=f"{record['memory_gib']:.1f}G", refresh=False)
            time_window, tok_window = 0.0, 0
        bar.update(1)
        if cfg.eval_steps and done_steps % cfg.eval_steps == 0 and done_steps != cfg.max_steps:
            do_eval(done_steps)
        due_steps = cfg.save_steps and done_steps % cfg.save_steps == 0
        due_time = cfg.save_minutes and time.monotonic() - last_save >= cfg.save_minutes * 60
        if (due_steps or due_time) and done_steps != cfg.max_steps:
            save(done_steps)
    bar.close()
    if neftune is not None:
        neftune.remove()
    do_eval(cfg.max_steps)
    if main:
        _finish(built, cfg, out, log_history, identity, time.perf_counter() - t_start, profile, packed, resumed_from)
    save(cfg.max_steps)
    merged = None
    if cfg.merge and main:
        from trkit.merge import merge_adapter

        merged = merge_adapter(built.source, out / ADAPTER_DIR, out / "merged", overwrite=True,
                               progress=cfg.progress)
    if cfg.push_to_hub and main:
        push_to_hub(out, cfg.push_to_hub)
    accelerator.wait_for_everyone()
    return RunResult(out, cfg.max_steps, log_history, out / ADAPTER_DIR, time.perf_counter() - t_start, resumed_from,
                     merged)


def check_distributed_type(kind: str) -> None:
    """Refuse an ``accelerate launch`` mode the loop does not implement (before any model is loaded).

    Data parallelism (``MULTI_GPU``, ``MULTI_CPU``) is what the loop is written and tested for: each process
    holds the whole (4-bit) model and its own optimizer over the same trainable parameters. FSDP and DeepSpeed
    shard parameters and need the optimizer built after wrapping and gathered adapter saves; this loop does
    neither, so it says so instead of training wrong parameters.
    """
    name = kind.rsplit(".", 1)[-1].upper()
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA", "TP"):
        raise ValueError(f"accelerate launch with {name} is not supported by `trkit train` (it runs data-parallel only): "
                         "run `accelerate launch --multi_gpu --num_processes N -m trkit train ...` (DDP; each GPU holds "
                         "the 4-bit model, Qwen3-8B fits a 16 GB card) or pass --config_file with distributed_type: MULTI_GPU")


def _memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _read_log(out: Path) -> list[dict]:
    path = out / LOG_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is not trusted
    return rows


def _write_log(out: Path, rows: list[dict]) -> None:
    from trkit.artifacts import atomic_write_text

    atomic_write_text(out / LOG_NAME, "".join(json.dumps(r) + "\n" for r in rows))


def _finish(built: Built, cfg: TrainConfig, out: Path, log_history: list[dict], identity: dict, seconds: float,
            profile, packed, resumed_from) -> None:
    """Write the final adapter (with the tokenizer), the model card and the run's manifest."""
    from trkit import artifacts

    with artifacts.atomic_directory(out / ADAPTER_DIR, overwrite=True, require_manifest=False) as tmp:
        save_adapter_files(built, cfg, tmp)
        built.tokenizer.save_pretrained(str(tmp))
        card = model_card(cfg, log_history, profile, packed, seconds, built)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        artifacts.write_manifest(tmp, "train-adapter", model=str(built.source), config_hash=config_hash(identity))
    (out / "README.md").write_text(card, encoding="utf-8")
    artifacts.write_manifest(out, "train", model=str(built.source), adapter=ADAPTER_DIR, steps=cfg.max_steps,
                             config_hash=config_hash(identity), resumed_from=resumed_from)


def model_card(cfg: TrainConfig, log_history: list[dict], profile, packed, seconds: float, built: Built) -> str:
    """A model card with the measured tables: validation BPC before/after, the config, hardware, time."""
    evals = [r for r in log_history if any(k.startswith("eval/") for k in r)]
    losses = [r for r in log_history if "loss" in r]
    lines = [f"# {Path(cfg.out).name}: Turkish adapter trained with trkit", "",
             f"Base (extended) checkpoint: `{built.source}`. Load it with:", "", "```python",
             "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"model = AutoModelForCausalLM.from_pretrained('{built.source}')",
             "model = PeftModel.from_pretrained(model, 'adapter')  # this directory",
             "tokenizer = AutoTokenizer.from_pretrained('adapter')", "```", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += ["## Validation bits per character (lower is better)", "", "| text | before (step %d) | after (step %d) | change |"
                  % (first["step"], last["step"]), "|---|---:|---:|---:|"]
        for key in sorted(k for k in last if k.startswith("eval/")):
            a, b = first.get(key), last[key]
            change = f"{(b / a - 1) * 100:+.1f}%" if a else "-"
            lines.append(f"| {key[5:-4]} | {a:.4f} | {b:.4f} | {change} |" if a else f"| {key[5:-4]} | - | {b:.4f} | - |")
        lines.append("")
    if losses:
        lines += [f"Training loss (nats/token): {losses[0]['loss']:.3f} at step {losses[0]['step']} -> "
                  f"{losses[-1]['loss']:.3f} at step {losses[-1]['step']}.", ""]
    stats = packed.stats
    lines += ["## Run", "", "| setting | value |", "|---|---|",
              f"| stage | {cfg.stage} |", f"| adapter | {cfg.adapter if cfg.stage == 'adapters' else 'none (new rows only)'} |",
              f"| new-token rows trained | {len(built.new_ids)} |",
              f"| rank / alpha / dropout | {cfg.rank} / {cfg.alpha} / {cfg.dropout} |",
              f"| optimizer | {cfg.optimizer}, lr {cfg.lr:g}, embedding lr {cfg.embedding_lr:g}, warm-up {cfg.warmup_steps} |",
              f"| steps x batch x accumulation x seq len | {cfg.max_steps} x {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} |",
              f"| loss | {cfg.loss} cross-entropy" + (f" + KD (weight {cfg.kd_weight}, T {cfg.kd_temperature})" if cfg.distill else "") + " |",
              f"| NEFTune alpha | {cfg.neftune_alpha:g} |",
              f"| corpus | {', '.join(cfg.corpus)}: {stats.get('documents')} documents, {stats.get('blocks')} blocks |",
              f"| hardware | profile {profile.name} ({profile.device}, {cfg.dtype}) |",
              f"| wall time | {seconds / 60:.1f} min |", ""]
    return "\n".join(lines)


def push_to_hub(out: Path, repo: str) -> str:
    """Upload ``OUT/adapter`` (with the tokenizer and model card) to a hub repository; the token comes from
    the environment or Colab secrets and is never printed."""
    from huggingface_hub import HfApi

    from trkit.colab import hf_token

    token = hf_token()
    if not token:
        raise RuntimeError("--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN (or Colab's "
                           "Secrets panel)")
    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True, private=True)
    api.upload_folder(repo_id=repo, folder_path=str(out / ADAPTER_DIR), commit_message="trkit train")
    return repo


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit train --model DIR --corpus default --stage rows --out DIR ...
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trkit import options as o

    d = TrainConfig(model="", out="")
    a = parser.add_argument
    a("--model", required=True, help="the extended checkpoint (trkit embed output), a hub name, an alias (smollm2, "
      "qwen3-tiny), or a `--stage rows` run's --out (its rows are merged first)")
    a("--corpus", nargs="+", default=["default"], help="default | trkit corpus dir | text/JSONL/parquet files | hub dataset")
    a("--stage", choices=STAGES, default=d.stage, help="rows: only the new-token rows; adapters: adapters + new rows")
    a("--out", required=True, help="run directory (checkpoints, adapter, log, model card); on Colab put it on Drive")
    a("--format", choices=("text", "chat"), default=d.format, help="text: continued pretraining; chat: instruction data")
    a("--text-field", default=d.text_field, help="text column of JSONL/parquet input")
    a("--max-documents", type=o.positive_int, help="read at most this many documents (hub corpora)")
    a("--tokenizer", help="tokenizer dir (default: the model's own)")
    a("--adapter", choices=ADAPTERS, default=d.adapter, help="dora (trkit's), peft-dora, lora, none")
    a("--rank", type=o.positive_int, default=d.rank)
    a("--alpha", type=o.positive_float, default=d.alpha)
    a("--dropout", type=o.probability_below_one, default=d.dropout, help="adapter dropout (0 recommended with DoRA)")
    a("--targets", default=",".join(ALL_TARGETS), help="comma-separated projections to adapt")
    a("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    a("--lr", type=o.positive_float, default=d.lr, help="adapter learning rate")
    a("--embedding-lr", type=o.positive_float, help="new-row learning rate (default 1e-3 for rows, lr/2 for adapters)")
    a("--embedding-eps", type=o.positive_float,
      help="AdamW eps of the new rows (default: half the gradient one occurrence of a token gives its output row, "
           "measured on the first batch; see trkit.train.row_eps)")
    a("--weight-decay", type=o.nonnegative_float, default=d.weight_decay)
    a("--warmup-steps", type=o.nonnegative_int, help="linear warm-up steps (default 5%% of --max-steps)")
    a("--max-grad-norm", type=o.nonnegative_float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    a("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="auto: adamw8bit on a T4, else adamw")
    a("--rho", type=o.positive_float, default=d.rho, help="SophiaG clipping constant")
    a("--hessian-every", type=o.positive_int, default=d.hessian_every, help="SophiaG: GNB pass every k steps")
    a("--max-steps", type=o.positive_int, default=d.max_steps)
    a("--seq-len", type=o.positive_int, help="tokens per block (default: the profile's)")
    a("--batch-size", type=o.positive_int, help="micro-batch per process (default: the profile's)")
    a("--grad-accum", type=o.positive_int, help="micro-batches per optimizer step (default: the profile's)")
    a("--seed", type=o.nonnegative_int, default=d.seed)
    a("--neftune-alpha", type=o.nonnegative_float, default=d.neftune_alpha, help="NEFTune noise (0: off; paper: 5-15)")
    a("--loss", choices=LOSSES, default=d.loss, help="chunked: no full-vocabulary logits; full: the model's own head")
    a("--loss-chunk", type=o.positive_int, default=d.loss_chunk, help="positions per loss chunk")
    a("--save-steps", type=o.nonnegative_int, default=d.save_steps, help="checkpoint every N steps (0: off)")
    a("--save-minutes", type=o.nonnegative_float, default=d.save_minutes, help="and every M minutes (0: off)")
    a("--keep", type=o.positive_int, default=d.keep, help="checkpoints kept")
    a("--resume", default=d.resume, help="auto (default: continue the newest complete checkpoint) | never | a checkpoint dir")
    a("--eval-steps", type=o.nonnegative_int, default=d.eval_steps, help="validation BPC every N steps (0: start and end only)")
    a("--eval-chars", type=o.nonnegative_int, default=d.eval_chars, help="characters of Turkish / English validation text (0: no eval)")
    a("--logging-steps", type=o.positive_int, default=d.logging_steps)
    a("--profile", default=d.profile, help="auto | cpu | t4 | a100 | gpu")
    a("--dtype", choices=("float32", "float16", "bfloat16"), help="compute dtype (default: the profile's)")
    a("--gradient-checkpointing", choices=("on", "off"), help="recompute activations in backward (default: the profile's)")
    a("--merge", action="store_true", help="also write OUT/merged: a full checkpoint with the adapter merged in")
    a("--push-to-hub", metavar="REPO", help="upload OUT/adapter to this hub repository (token from HF_TOKEN / Colab secrets)")
    a("--overwrite", action="store_true", help="discard an earlier run in --out and start again")
    a("--distill", metavar="CACHE_DIR", help="knowledge distillation from a teacher cache (python -m trkit distill cache)")
    a("--kd-weight", type=o.unit_interval, default=d.kd_weight, help="weight of the KD term (1 - weight on cross-entropy)")
    a("--kd-temperature", type=o.positive_float, default=d.kd_temperature, help="KD temperature T (loss scaled by T^2)")
    a("--kd-mode", choices=("rest", "renormalized", "uld"), default=d.kd_mode,
      help="KD over the teacher's top-k: rest (+ one bucket for the remaining mass, exact), renormalized, or uld "
           "(a teacher of another tokenizer family; see trkit.distill)")
    a("--kd-chain-weight", type=o.nonnegative_float, default=d.kd_chain_weight,
      help="weight of the chain-rule term on realised new tokens (extended student; 0: off)")
    a("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.gradient_checkpointing is not None:
        values["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    values["progress"] = not args.quiet
    return TrainConfig(**values)


def run_cli(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = train(config)
    last = next((r for r in reversed(result.log) if "loss" in r), None)
    evals = [r for r in result.log if any(k.startswith("eval/") for k in r)]
    msg = f"trained {result.steps} steps in {result.seconds / 60:.1f} min -> {result.adapter}"
    if last:
        msg += f"; loss {last['loss']:.3f}"
    if evals:
        msg += "; validation BPC " + ", ".join(f"{k[5:-4]} {evals[0].get(k, float('nan')):.3f} -> {v:.3f}"
                                               for k, v in evals[-1].items() if k.startswith("eval/"))
    print(msg)
    return 0
