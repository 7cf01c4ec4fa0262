"""Embedding surgery: grow a checkpoint's vocabulary to an extended tokenizer and initialise the new rows.

What it does. A vocabulary extension (``trkit.vocab``) appends merges to the base tokenizer, so
every new token ``w`` is a concatenation of base tokens ``c_1 .. c_k`` (its merge tree's leaves;
exact, because the extended segmentation is a coarsening of the base one). The model needs one
input row and one output row per new id. Rows are added for ``len(extended_tokenizer)`` ids,
padded to a multiple of 64, and **every** row from ``len(base_tokenizer)`` on is (re)initialised,
including rows that existed but were never trained (Qwen3-8B: ids 151,669-151,935).

Input rows (``init``):

* ``fvt``: ``e_w = mean_i e_{c_i}`` (Fast Vocabulary Transfer, Gee et al. 2022, "Fast Vocabulary
  Transfer for Language Model Compression"); the decomposition is the merge tree, not a re-tokenisation.
* ``mean``: the mean of all trained rows (Hewitt 2021, "Initializing new word embeddings for
  pretrained language models").
* ``random``: ``N(0, 0.02^2)``, the usual transformer initialiser (seeded).

Output rows (``output_init``) accept the same three rules, ``first`` (``u_w = u_{c_1}``, the
first constituent's row) and the default ``fvt_offset``:

* ``fvt_offset``: ``u_w = mean_i u_{c_i} + s * b_w * d``. Why: a merged token should not be as
  likely as its pieces. The base model gives the string of ``w`` the probability
  ``p(c_1 | h) p(c_2..c_k | h, c_1)``, so the logit of ``w`` belongs *below* the level of its
  constituents by about ``-log p(c_2..c_k | c_1)``. We estimate that log-probability by counting:
  ``b_w = log((n_ext(w) + 1/2) / (n_base(c_1) + 1))`` (<= 0), the share of the corpus positions where
  the base tokenizer emits ``c_1`` that the extended tokenizer turns into ``w`` (exact pairing: the
  extension is a coarsening). An LM head has no bias, but the final RMSNorm output has a nearly
  constant component: the ridge solution ``d`` of ``H d ~ 1`` over calibration hidden states (on
  SmolLM2, ``h . d = 1.00 +- 0.03``) turns an offset into a row update. The FVT part keeps the
  context match (the logit is high only where every piece fits, e.g. in Turkish text), the offset
  keeps merged tokens from drawing probability in English contexts. ``s`` (default chosen on the
  calibration text from {0, 1/4, 1/2, 3/4, 1}: lowest Turkish loss whose English loss stays within
  ``english_tolerance`` of the base model's) tempers the count estimate.
  Measured on SmolLM2-135M + 20k Turkish tokens (benchmarks/bench_embeddings.py): plain ``fvt``
  moves English bits per character by +1.4%, ``fvt_offset`` by +0.2%, and Turkish gets better too.

  The base half of ``fvt_offset``: in the extended text a base token ``c`` is emitted only where no
  merge absorbs it. Where the base model would emit ``c`` next, the extended tokenizer emits ``c`` itself
  at a share ``exp(a_c)`` of those token boundaries and a merged token that starts with ``c`` at the rest,
  so the base output row keeps only that share of ``c``'s probability: ``u_c += t * a_c * d_L`` with
  ``a_c = log((n_ext(c) + 1/2) / (D(c) + 1))``, ``D(c) = n_ext(c) + sum_{w starts with c} n_ext(w)``
  (counted on the corpus). Without it the base pieces keep the probability their merged forms should
  take, and a Turkish word keeps being started with its first piece. ``d_L`` is the ridge solution of
  ``h . d_L = 1`` on Turkish and ``0`` on English calibration states, so the correction acts in Turkish
  contexts only (an English `` a`` keeps its probability though Turkish merges start with it); ``t``
  is chosen on the calibration text from {0, 1/4, 1/2, 3/4, 1} like ``s``. Measured on SmolLM2 + 20k
  (notebook 02 / ``benchmarks/bench_embeddings.py``): Turkish BPC at init 3.269 -> 3.237 (t = 1), English
  +0.17%; the same correction along ``d`` (every context) cost English 4%.

A model with tied embeddings (SmolLM2, Qwen3-0.6B..4B) keeps them tied when the output rule is the
input rule; otherwise the output matrix is untied (``lm_head.weight`` written separately,
``tie_word_embeddings=false``), which costs one more ``rows x hidden`` matrix.

Two paths give identical tensors (tested):

* ``extend_model(model, ext_dir)``: in memory (model object in, model out).
* ``extend_checkpoint(src, ext_dir, out)``: edits a safetensors checkpoint directory (local or a hub
  snapshot) without loading the model: only ``embed_tokens`` / ``lm_head`` are read; shards that hold
  them are rewritten tensor by tensor (untouched tensors are byte ranges copied from the source), the
  other shards are hard-linked (or copied), the index and ``config.json`` (``vocab_size``) are updated
  and the extended tokenizer is written beside them. Peak RAM is about the size of the new matrices,
  so Qwen3-8B (16 GB of bf16) can be extended on a free Colab (12.7 GB RAM).

Tied checkpoints are decided per file (``plan_checkpoint``): a stored ``lm_head.weight`` identical to
``embed_tokens`` is tied, a different one untied (written with ``tie_word_embeddings: false``). Every
input shard is verified before it is linked or copied. Reading and writing safetensors lives in
:mod:`trkit.checkpoints`; training the new rows lives in :mod:`trkit.train`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from trkit.artifacts import MANIFEST_NAME, atomic_directory, read_manifest, sha256_file, write_manifest
from trkit.checkpoints import (INDEX_NAME, link_or_copy, read_rows_into, read_safetensors_header, resolve_checkpoint,
                               verify_checkpoint, weight_map, write_safetensors_streaming)
from trkit.options import check_output, nonnegative_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

PAD_MULTIPLE = 64
INPUT_INITS = ("fvt", "mean", "random")
OUTPUT_INITS = ("fvt_offset", "fvt", "mean", "random", "first")
DEFAULT_INIT = "fvt"
DEFAULT_OUTPUT_INIT = "fvt_offset"
RANDOM_STD = 0.02
CHUNK_ROWS = 1024
INPUT_KEY_SUFFIX = "embed_tokens.weight"
OUTPUT_KEY = "lm_head.weight"
OFFSET_STATS_NAME = "trkit_offset_stats.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


# --------------------------------------------------------------------------------------------
# The extension: which ids are new and what they are made of
# --------------------------------------------------------------------------------------------


@dataclass
class Extension:
    """What the embedding surgery needs from a ``trkit vocab`` directory."""

    directory: Path
    base_vocab_size: int  # len(base tokenizer): the first id to initialise
    vocab_size: int  # len(extended tokenizer)
    base_fingerprint: str
    constituents: dict[int, list[int]]  # new id -> base ids (merge-tree leaves, left to right)
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def new_ids(self) -> list[int]:
        return list(range(self.base_vocab_size, self.vocab_size))

    def rows(self, existing_rows: int = 0, multiple: int = PAD_MULTIPLE) -> int:
        """Rows of the resized matrices: the vocabulary padded to ``multiple``, never fewer than exist."""
        return max(existing_rows, padded_size(self.vocab_size, multiple))


def padded_size(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def load_extension(ext_dir: str | os.PathLike) -> Extension:
    """Read and verify a ``trkit vocab`` directory (manifest hashes, constituents, contiguous new ids)."""
    from trkit.vocab import new_token_constituents

    ext_dir = Path(ext_dir)
    manifest = read_manifest(ext_dir, verify=True)
    if manifest.get("stage") != "vocab":
        raise ValueError(f"{ext_dir} was written by stage {manifest.get('stage')!r}, not `trkit vocab`; "
                         "pass the directory that `python -m trkit vocab --out DIR` wrote")
    base = int(manifest["base_vocab_size"])
    constituents = new_token_constituents(ext_dir)
    vocab_size = base + len(constituents)
    if sorted(constituents) != list(range(base, vocab_size)):
        raise ValueError(f"{ext_dir}: new token ids are not contiguous from {base}; the directory is not a "
                         "trkit vocabulary extension (re-run `trkit vocab`)")
    for i, parts in constituents.items():
        if not parts or any(not 0 <= p < base for p in parts):
            raise ValueError(f"{ext_dir}: new token {i} decomposes into {parts}, not into base ids < {base}")
    if not constituents:
        raise ValueError(f"{ext_dir} adds no tokens (0 new tokens): there are no rows to initialise; learn a "
                         "vocabulary with `trkit vocab --new-tokens N` first")
    return Extension(ext_dir, base, vocab_size, manifest["base_fingerprint"], constituents, manifest)


def new_token_ids(ext: Extension | str | os.PathLike) -> list[int]:
    """The ids the extension added (``len(base) .. len(extended) - 1``)."""
    ext = ext if isinstance(ext, Extension) else load_extension(ext)
    return ext.new_ids


def check_tokenizer_pair(ext: Extension, base_tokenizer_dir: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tokenizer is not the extension's base, or an extension that moved ids.

    ``base_tokenizer_dir`` is the checkpoint's own tokenizer (a dir with tokenizer.json).
    """
    from trkit.vocab import tokenizer_fingerprint

    base_tj = _read_tokenizer_json(base_tokenizer_dir)
    ext_tj = _read_tokenizer_json(ext.directory)
    fp = tokenizer_fingerprint(base_tj)
    if fp != ext.base_fingerprint:
        raise ValueError(
            f"the checkpoint's tokenizer ({base_tokenizer_dir}, fingerprint {fp[:12]}…) is not the base of the "
            f"extension {ext.directory} (base fingerprint {ext.base_fingerprint[:12]}…): learn the vocabulary on "
            "this model's own tokenizer (`trkit vocab --base <the checkpoint>`) or pass the checkpoint it was "
            "learned for"
        )
    base_vocab = _full_vocab(base_tj)
    ext_vocab = _full_vocab(ext_tj)
    if len(base_vocab) != ext.base_vocab_size:
        raise ValueError(f"the base tokenizer has {len(base_vocab)} tokens but the extension says "
                         f"{ext.base_vocab_size}: the extension's manifest does not describe this tokenizer")
    moved = [(t, i, ext_vocab.get(t)) for t, i in base_vocab.items() if ext_vocab.get(t) != i]
    if moved:
        t, i, j = moved[0]
        raise ValueError(f"{ext.directory} is not an extension of the checkpoint's tokenizer: {len(moved)} existing "
                         f"tokens changed id (e.g. {t!r} {i} -> {j}); the pretrained rows would no longer match. "
                         "Rebuild it with `trkit vocab`, which keeps every existing id")
    extra = sorted(i for t, i in ext_vocab.items() if t not in base_vocab)
    if extra != ext.new_ids:
        raise ValueError(f"{ext.directory}: the tokenizer's new ids do not match its manifest "
                         f"({len(extra)} new ids in tokenizer.json, {len(ext.new_ids)} in the manifest)")


def _read_tokenizer_json(d: str | os.PathLike) -> dict:
    p = Path(d)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: the checkpoint needs its fast tokenizer (tokenizer.json) so the "
                                "extension's base can be checked; pass --base-tokenizer DIR if it lives elsewhere")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not a valid tokenizer.json ({exc}): the file is damaged or was only partly "
                         "written; re-download it (or re-run `trkit vocab`)") from None


def _full_vocab(tj: dict) -> dict[str, int]:
    vocab = dict(tj["model"]["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    return vocab


# --------------------------------------------------------------------------------------------
# Row initialisation (shared by both paths, so they give identical tensors)
# --------------------------------------------------------------------------------------------


def check_finite(weight: "torch.Tensor", rows: int, name: str) -> None:
    """Refuse NaN/Inf in the first ``rows`` rows (chunked, no float copy of the whole matrix)."""
    import torch

    for lo in range(0, rows, CHUNK_ROWS):
        block = weight[lo : min(rows, lo + CHUNK_ROWS)]
        # a row sum is NaN/Inf iff the row holds NaN/Inf (float64: no overflow for any 16/32-bit weight)
        bad = ~torch.isfinite(block.double().sum(dim=1))
        if bad.any():
            first = lo + int(bad.nonzero()[0])
            raise ValueError(f"{name} row {first} holds NaN/Inf ({int(bad.sum())} bad rows in {lo}..{lo + len(block) - 1}): "
                             "the checkpoint is damaged; re-download it or load it in a wider dtype")


def trained_mean(weight: "torch.Tensor", rows: int) -> "torch.Tensor":
    """Mean of rows ``0..rows-1`` in float32, chunked."""
    import torch

    acc = torch.zeros(weight.shape[1], dtype=torch.float64)
    for lo in range(0, rows, CHUNK_ROWS):
        acc += weight[lo : min(rows, lo + CHUNK_ROWS)].double().sum(0).cpu()
    return (acc / rows).float()


@dataclass
class OffsetStats:
    """What the ``fvt_offset`` output rule needs besides the matrix (see the module doc).

    ``direction``: ``d`` with ``h . d ~ 1`` for final hidden states ``h``; ``log_continuation``:
    ``b_w`` for every new id (aligned with ``Extension.new_ids``); ``scale``: ``s``.
    """

    direction: "torch.Tensor"
    log_continuation: "torch.Tensor"
    scale: float = 0.5
    report: dict = field(default_factory=dict)
    # the base rows' split (module doc): a_c for every base id, the Turkish direction d_L, the scale t
    base_log_share: "torch.Tensor | None" = None
    language_direction: "torch.Tensor | None" = None
    base_scale: float = 0.0

    def offsets(self) -> "torch.Tensor":
        return self.scale * self.log_continuation.float()

    @property
    def corrects_base_rows(self) -> bool:
        return self.base_scale > 0 and self.base_log_share is not None and self.language_direction is not None

    def save(self, path: str | os.PathLike) -> Path:
        """JSON (not a .safetensors file: serving tools load every *.safetensors in a model dir).
        float32 values round-trip exactly through JSON's doubles."""
        from trkit.artifacts import atomic_write_json

        data = {"scale": float(self.scale), "report": self.report, "direction": self.direction.float().tolist(),
                "log_continuation": self.log_continuation.float().tolist(), "base_scale": float(self.base_scale)}
        if self.base_log_share is not None and self.language_direction is not None:
            data["base_log_share"] = self.base_log_share.float().tolist()
            data["language_direction"] = self.language_direction.float().tolist()
        return atomic_write_json(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OffsetStats":
        import torch

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        optional = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("base_log_share", "language_direction")
                    if k in data}
        return cls(torch.tensor(data["direction"], dtype=torch.float32),
                   torch.tensor(data["log_continuation"], dtype=torch.float32), float(data["scale"]),
                   data.get("report", {}), base_scale=float(data.get("base_scale", 0.0)), **optional)


def init_new_rows(
    weight: "torch.Tensor",
    ext: Extension,
    method: str,
    *,
    seed: int = 0,
    offsets: OffsetStats | None = None,
    progress: bool = False,
    desc: str = "init rows",
) -> None:
    """Initialise rows ``ext.base_vocab_size ..`` of ``weight`` in place (rows beyond the vocabulary too).

    ``weight`` already holds the trained rows ``0 .. base_vocab_size-1``. Values are computed in
    float32 per chunk and cast to the weight's dtype. Rows past ``ext.vocab_size`` (padding to a
    multiple of 64; never produced by the tokenizer) get the mean of the trained rows.
    """
    import torch
    from trkit.progress import tqdm

    if method not in OUTPUT_INITS:
        raise ValueError(f"unknown init {method!r}; choose one of {', '.join(OUTPUT_INITS)}")
    base, n_rows = ext.base_vocab_size, weight.shape[0]
    if n_rows < ext.vocab_size:
        raise ValueError(f"matrix has {n_rows} rows, fewer than the extended vocabulary ({ext.vocab_size})")
    check_finite(weight, base, "embedding")
    mean = trained_mean(weight, base)
    dtype = weight.dtype
    gen = torch.Generator().manual_seed(seed)
    ids = ext.new_ids
    if method == "fvt_offset":
        if offsets is None:
            raise ValueError("output init 'fvt_offset' needs OffsetStats (see estimate_offset_stats)")
        if offsets.log_continuation.numel() != len(ext.new_ids) or offsets.direction.numel() != weight.shape[1]:
            raise ValueError(f"offset statistics for {offsets.log_continuation.numel()} tokens / hidden "
                             f"{offsets.direction.numel()} do not fit this extension ({len(ext.new_ids)} tokens) "
                             f"and matrix (hidden {weight.shape[1]}): estimate them for this model and tokenizer")
        shift = offsets.offsets()[:, None] * offsets.direction.float()[None, :]
    with torch.no_grad():
        for lo in tqdm(range(0, len(ids), CHUNK_ROWS), desc=desc, disable=not progress, unit="chunk"):
            chunk = ids[lo : lo + CHUNK_ROWS]
            if method == "mean":
                rows = mean.expand(len(chunk), -1)
            elif method == "random":
                rows = torch.randn(len(chunk), weight.shape[1], generator=gen) * RANDOM_STD
            elif method == "first":
                rows = weight[[ext.constituents[i][0] for i in chunk]].float().cpu()
            else:  # fvt, fvt_offset: segment means of the constituents' rows
                parts = [ext.constituents[i] for i in chunk]
                flat = torch.tensor([p for ps in parts for p in ps])
                seg = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(ps) for ps in parts]))
                sums = torch.zeros(len(chunk), weight.shape[1]).index_add_(0, seg, weight[flat.to(weight.device)].float().cpu())
                rows = sums / torch.tensor([float(len(ps)) for ps in parts])[:, None]
                if method == "fvt_offset":
                    rows = rows + shift[lo : lo + len(chunk)]
            weight[chunk[0] : chunk[-1] + 1] = rows.to(device=weight.device, dtype=dtype)
        if n_rows > ext.vocab_size:
            weight[ext.vocab_size :] = mean.to(device=weight.device, dtype=dtype)
    check_finite(weight, n_rows, "initialised embedding")


def correct_base_rows(weight: "torch.Tensor", ext: Extension, offsets: OffsetStats | None, *,
                      progress: bool = False) -> None:
    """The base half of ``fvt_offset`` (module doc): ``u_c += t * a_c * d_L`` for every base id ``c``, in place.

    A no-op unless ``offsets`` carries the split (``base_scale > 0``). Computed in float32 per chunk."""
    import torch
    from trkit.progress import tqdm

    if offsets is None or not offsets.corrects_base_rows:
        return
    base = ext.base_vocab_size
    if offsets.base_log_share.numel() != base or offsets.language_direction.numel() != weight.shape[1]:
        raise ValueError(f"base-row statistics for {offsets.base_log_share.numel()} tokens / hidden "
                         f"{offsets.language_direction.numel()} do not fit this extension ({base} base tokens) and "
                         f"matrix (hidden {weight.shape[1]}): estimate them for this model and tokenizer")
    shift = (offsets.base_scale * offsets.base_log_share.float())
    d = offsets.language_direction.float()
    with torch.no_grad():
        for lo in tqdm(range(0, base, CHUNK_ROWS * 8), desc="base output rows", disable=not progress, unit="chunk"):
            hi = min(base, lo + CHUNK_ROWS * 8)
            rows = weight[lo:hi].float().cpu() + shift[lo:hi, None] * d[None, :]
            weight[lo:hi] = rows.to(device=weight.device, dtype=weight.dtype)
    check_finite(weight, weight.shape[0], "corrected output embedding")


# --------------------------------------------------------------------------------------------
# In-memory path
# --------------------------------------------------------------------------------------------


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def extend_model(
    model,
    ext: Extension | str | os.PathLike,
    *,
    init: str = DEFAULT_INIT,
    output_init: str | None = DEFAULT_OUTPUT_INIT,
    offsets: OffsetStats | None = None,
    base_tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = False,
):
    """Resize ``model``'s embeddings (and untied ``lm_head``) to the extension and initialise the new rows.

    ``output_init=None`` uses ``init`` for the output rows. A tied model stays tied when both rules
    are the same and is untied otherwise. ``base_tokenizer``: the model's own tokenizer directory,
    checked against the extension's base fingerprint (recommended; the checkpoint path always checks).
    Returns the model (changed in place).
    """
    import torch

    ext = ext if isinstance(ext, Extension) else load_extension(ext)
    output_init = output_init or init
    _check_methods(init, output_init, offsets)
    if base_tokenizer is not None:
        check_tokenizer_pair(ext, base_tokenizer)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < ext.base_vocab_size:
        raise ValueError(f"the model has {old_rows} embedding rows but its tokenizer {ext.base_vocab_size} tokens: "
                         "this extension was not learned for this model's tokenizer")
    rows = ext.rows(old_rows)
    tied = _is_tied(model)
    has_output = model.get_output_embeddings() is not None
    with torch.no_grad():
        model.resize_token_embeddings(rows, mean_resizing=False)
        emb = model.get_input_embeddings().weight
        if tied and output_init != init:
            # untie: the output matrix starts as a copy of the trained (shared) rows
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
            tied = False
        init_new_rows(emb.data, ext, init, seed=seed, progress=progress, desc="input rows")
        if has_output and not tied:
            init_new_rows(model.get_output_embeddings().weight.data, ext, output_init, seed=seed + 1, offsets=offsets,
                          progress=progress, desc="output rows")
            if output_init == "fvt_offset":
                correct_base_rows(model.get_output_embeddings().weight.data, ext, offsets, progress=progress)
    model.config.vocab_size = rows
    return model


def _check_methods(init: str, output_init: str, offsets: "OffsetStats | None") -> None:
    if init not in INPUT_INITS:
        raise ValueError(f"unknown input init {init!r}; choose one of {', '.join(INPUT_INITS)}")
    if output_init not in OUTPUT_INITS:
        raise ValueError(f"unknown output init {output_init!r}; choose one of {', '.join(OUTPUT_INITS)}")
    if output_init == "fvt_offset" and offsets is None:
        raise ValueError("output init 'fvt_offset' needs its statistics: pass offsets=estimate_offset_stats(...) "
                         "(the CLI estimates them), or choose another --output-init")


# --------------------------------------------------------------------------------------------
# Statistics of the fvt_offset output rule (a calibration pass over a little text)
# --------------------------------------------------------------------------------------------

OFFSET_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
BASE_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
ENGLISH_TOLERANCE = 0.005  # relative English loss increase allowed when choosing the scale


def token_counts(ext: Extension, base_tokenizer, ext_tokenizer, documents: Iterable[str],
                 batch: int = 2000) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(n_base, n_ext)``: how often each id occurs in the base and in the extended tokenizer's encoding
    of ``documents`` (float64 vectors of ``len(base)`` and ``len(extended)``)."""
    import torch

    docs = list(documents)
    if not docs:
        raise ValueError("no calibration text to count tokens on")
    n_base = torch.zeros(ext.base_vocab_size, dtype=torch.float64)
    n_ext = torch.zeros(ext.vocab_size, dtype=torch.float64)
    for lo in range(0, len(docs), batch):
        for counts, tok in ((n_base, base_tokenizer), (n_ext, ext_tokenizer)):
            ids = [i for seq in tok(docs[lo : lo + batch], add_special_tokens=False)["input_ids"] for i in seq]
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(counts))[: len(counts)].double()
    return n_base, n_ext


def _first_constituents(ext: Extension) -> "torch.Tensor":
    import torch

    return torch.tensor([ext.constituents[i][0] for i in ext.new_ids], dtype=torch.long)


def log_continuation(ext: Extension, base_tokenizer, ext_tokenizer, documents: Iterable[str],
                     batch: int = 2000, counts: tuple | None = None) -> "torch.Tensor":
    """``b_w = log((n_ext(w) + 1/2) / (n_base(c_1) + 1))`` for every new id, counted on ``documents``.

    ``n_base(c_1)``: how often the base tokenizer emits ``w``'s first constituent; ``n_ext(w)``:
    how often the extended tokenizer emits ``w`` (each such ``w`` starts at one of those ``c_1``).
    ``counts``: :func:`token_counts` already computed on ``documents``.
    """
    import torch

    n_base, n_ext = counts if counts is not None else token_counts(ext, base_tokenizer, ext_tokenizer, documents, batch)
    b = torch.log((n_ext[ext.base_vocab_size :] + 0.5) / (n_base[_first_constituents(ext)] + 1.0))
    return b.clamp(max=0.0).float()


def base_log_share(ext: Extension, n_ext: "torch.Tensor") -> "torch.Tensor":
    """``a_c = log((n_ext(c) + 1/2) / (D(c) + 1))`` for every base id ``c``, with
    ``D(c) = n_ext(c) + sum of n_ext(w) over new tokens w whose first constituent is c``: of the places where
    the extended text has a token boundary and the base model would emit ``c`` next, the share where the
    extended tokenizer emits ``c`` itself (elsewhere a merged token starting with ``c`` takes its place)."""
    import torch

    base = ext.base_vocab_size
    d = n_ext[:base].clone().index_add_(0, _first_constituents(ext), n_ext[base : ext.vocab_size])
    return torch.log((n_ext[:base] + 0.5) / (d + 1.0)).clamp(max=0.0).float()


def final_hidden_states(model, tokenizer, documents: Sequence[str], *, max_length: int = 512, batch_size: int = 8,
                        progress: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The inputs of the LM head (final normed hidden states) at every position, and the next tokens.

    Documents are prefixed as in ``trkit.evaluation`` and cut into independent chunks of
    ``max_length`` tokens. Captured with a forward pre-hook on the output embeddings, so it works for
    any causal LM (4-bit ones included). Returns float32 ``(N, hidden)`` on CPU and ``(N,)`` targets.
    """
    import torch
    from trkit.progress import tqdm

    from trkit.evaluation import document_prefix_id

    prefix = document_prefix_id(tokenizer)
    chunks = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        seq = [prefix] + ids
        for lo in range(0, len(seq) - 1, max_length):
            chunks.append(seq[lo : lo + max_length + 1])
    chunks.sort(key=len, reverse=True)
    captured: list = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    device = next(model.parameters()).device
    hs, ts = [], []
    try:
        with torch.inference_mode():
            for lo in tqdm(range(0, len(chunks), batch_size), desc="calibration", disable=not progress):
                batch = chunks[lo : lo + batch_size]
                width = max(len(c) for c in batch) - 1
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, c in enumerate(batch):  # right padding: positions are plain 0..n-1
                    ids[r, : len(c) - 1] = torch.tensor(c[:-1])
                    mask[r, : len(c) - 1] = 1
                captured.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                h = captured[-1]
                for r, c in enumerate(batch):
                    hs.append(h[r, : len(c) - 1].float().cpu())
                    ts.append(torch.tensor(c[1:]))
    finally:
        hook.remove()
    return torch.cat(hs), torch.cat(ts)


def constant_direction(hidden: "torch.Tensor", ridge: float = 1e-3) -> "torch.Tensor":
    """Ridge solution of ``hidden @ d = 1``: the direction along which every final hidden state has
    (nearly) the same projection, so ``b * d`` added to an output row adds ``~b`` to its logit."""
    import torch

    h = hidden.double()
    gram = h.T @ h
    lam = ridge * gram.diagonal().mean()
    d = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), h.sum(0))
    return d.float()


def _nll_with_new_rows(hidden, targets, head_weight, new_lo: int, new_rows_fvt, b, d, scales, chunk: int = 1024,
                       base_shift=None, language_direction=None, base_scales=(0.0,)):
    """Summed NLL (nats) of ``targets`` with output rows ``fvt + s b d`` for the new ids and, with
    ``base_shift`` (``a``) and ``language_direction`` (``d_L``), ``u_c + t a_c d_L`` for the base ids; one value
    per ``(s, t)`` in ``scales x base_scales`` (a ``len(scales) x len(base_scales)`` tensor)."""
    import torch

    device = head_weight.device
    out = torch.zeros(len(scales), len(base_scales), dtype=torch.float64)
    w_old = torch.cat([head_weight[:new_lo], head_weight[new_lo + len(b) :]]).float()  # trained + padding rows
    fvt_t = new_rows_fvt.float().to(device).T
    b = b.float().to(device)
    d = d.float().to(device)
    if base_shift is not None:
        base_shift = base_shift.float().to(device)
        language_direction = language_direction.float().to(device)
    for lo in range(0, len(hidden), chunk):
        h = hidden[lo : lo + chunk].to(device)
        t = targets[lo : lo + chunk].to(device)
        old0 = h @ w_old.T
        new0 = h @ fvt_t
        hd = h @ d
        hl = h @ language_direction if base_shift is not None else None
        is_new = (t >= new_lo) & (t < new_lo + len(b))
        t_old = torch.where(t >= new_lo + len(b), t - len(b), t).clamp(max=w_old.shape[0] - 1)
        for j, ts in enumerate(base_scales):
            old = old0
            if base_shift is not None and ts:
                old = old0.clone()
                old[:, : len(base_shift)] += ts * hl[:, None] * base_shift[None, :]
            old_lse = torch.logsumexp(old, -1)
            old_tgt = old.gather(1, t_old[:, None])[:, 0]
            for k, s in enumerate(scales):
                new = new0 + s * hd[:, None] * b[None, :]
                lse = torch.logaddexp(old_lse, torch.logsumexp(new, -1))
                tgt = torch.where(is_new, new.gather(1, (t - new_lo).clamp(0, len(b) - 1)[:, None])[:, 0], old_tgt)
                out[k, j] += (lse - tgt).double().sum().cpu()
    return out


def language_direction(turkish_hidden: "torch.Tensor", english_hidden: "torch.Tensor",
                       ridge: float = 1e-3) -> "torch.Tensor":
    """Ridge solution of ``h . d_L = 1`` on Turkish and ``= 0`` on English final hidden states: an update
    ``a * d_L`` of an output row moves its logit by about ``a`` in Turkish contexts and leaves English ones
    alone (on SmolLM2 + 20k: ``h . d_L`` = 0.98 +- 0.08 on held-out Turkish, 0.03 +- 0.15 on English)."""
    import torch

    h = torch.cat([turkish_hidden, english_hidden]).double()
    y = torch.cat([torch.ones(len(turkish_hidden)), torch.zeros(len(english_hidden))]).double()
    gram = h.T @ h
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), h.T @ y).float()


def estimate_offset_stats(
    model,
    ext: Extension | str | os.PathLike,
    base_tokenizer,
    ext_tokenizer,
    turkish: Sequence[str],
    english: Sequence[str] = (),
    *,
    count_documents: Iterable[str] | None = None,
    init: str = DEFAULT_INIT,
    scales: Sequence[float] = OFFSET_SCALES,
    base_scales: Sequence[float] = BASE_SCALES,
    english_tolerance: float = ENGLISH_TOLERANCE,
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> OffsetStats:
    """Estimate ``d``, ``b_w`` and choose ``s``, then the base rows' ``a_c``, ``d_L`` and ``t``, for ``fvt_offset``.

    ``model`` is the **base** model; it is extended in place with ``init`` input rows and ``fvt``
    output rows (load a fresh copy for the checkpoint path; 4-bit is fine). ``turkish`` /
    ``english``: a little calibration text (tens of KB; not the evaluation text). ``count_documents``
    (default ``turkish``): text to count ``b_w`` and ``a_c`` on, ideally the corpus the vocabulary was
    learned on. ``s`` is the scale with the lowest Turkish loss among those whose English loss is within
    ``english_tolerance`` (relative) of the base model's on the same English text (or the lowest
    English loss if none is); without English text, the lowest Turkish loss. ``t`` is then chosen the same
    way from ``base_scales`` with ``s`` fixed; without English text there is no ``d_L`` and ``t = 0``.
    """
    import torch

    ext = ext if isinstance(ext, Extension) else load_extension(ext)
    extend_model(model, ext, init=init, output_init="fvt")
    head = model.get_output_embeddings().weight
    counts = token_counts(ext, base_tokenizer, ext_tokenizer, count_documents if count_documents is not None else turkish)
    b = log_continuation(ext, base_tokenizer, ext_tokenizer, (), counts=counts)
    a = base_log_share(ext, counts[1])
    h_tr, t_tr = final_hidden_states(model, ext_tokenizer, turkish, max_length=max_length, batch_size=batch_size,
                                     progress=progress)
    parts = [h_tr]
    report: dict[str, Any] = {"turkish_tokens": int(len(t_tr))}
    if english:
        h_en, t_en = final_hidden_states(model, ext_tokenizer, english, max_length=max_length, batch_size=batch_size)
        # English in the base tokenization never touches a new input row: these are the base model's states
        h_b, t_b = final_hidden_states(model, base_tokenizer, english, max_length=max_length, batch_size=batch_size)
        parts.append(h_en)
    d = constant_direction(torch.cat(parts))
    proj = torch.cat(parts) @ d
    report.update(direction_fit_mean=float(proj.mean()), direction_fit_std=float(proj.std()))
    d_lang = None
    if english:
        d_lang = language_direction(h_tr, h_en)
        report.update(language_direction_turkish=[float((h_tr @ d_lang).mean()), float((h_tr @ d_lang).std())],
                      language_direction_english=[float((h_en @ d_lang).mean()), float((h_en @ d_lang).std())])

    def choose(nll_tr, nll_en, base_en, values) -> int:
        ok = list(range(len(values)))
        if nll_en is not None:
            rel = [float(v) / base_en - 1.0 for v in nll_en]
            ok = [k for k in range(len(values)) if rel[k] <= english_tolerance] or [int(min(range(len(values)), key=rel.__getitem__))]
        return min(ok, key=lambda k: float(nll_tr[k]))

    with torch.no_grad():
        fvt_rows = head[ext.base_vocab_size : ext.vocab_size].detach()
        w = head.detach()
        nll_tr = _nll_with_new_rows(h_tr, t_tr, w, ext.base_vocab_size, fvt_rows, b, d, scales)[:, 0]
        report["turkish_nll_per_token"] = {str(s): float(v) / len(t_tr) for s, v in zip(scales, nll_tr)}
        nll_en = base_en = None
        if english:
            nll_en = _nll_with_new_rows(h_en, t_en, w, ext.base_vocab_size, fvt_rows, b, d, scales)[:, 0]
            w_base = head[: ext.base_vocab_size].detach().float()
            base_en = sum(float(torch.nn.functional.cross_entropy(h_b[lo : lo + 1024].to(w_base.device) @ w_base.T,
                                                                  t_b[lo : lo + 1024].to(w_base.device), reduction="sum"))
                          for lo in range(0, len(h_b), 1024))
            report["english_relative_change"] = {str(s): float(v) / base_en - 1.0 for s, v in zip(scales, nll_en)}
        best = choose(nll_tr, nll_en, base_en, scales)
        base_scale = 0.0
        if d_lang is not None and len(base_scales) > 1:
            s_best = [scales[best]]
            kw = dict(base_shift=a, language_direction=d_lang, base_scales=base_scales)
            bt = _nll_with_new_rows(h_tr, t_tr, w, ext.base_vocab_size, fvt_rows, b, d, s_best, **kw)[0]
            be = _nll_with_new_rows(h_en, t_en, w, ext.base_vocab_size, fvt_rows, b, d, s_best, **kw)[0]
            report["base_turkish_nll_per_token"] = {str(t): float(v) / len(t_tr) for t, v in zip(base_scales, bt)}
            report["base_english_relative_change"] = {str(t): float(v) / base_en - 1.0 for t, v in zip(base_scales, be)}
            base_scale = float(base_scales[choose(bt, be, base_en, base_scales)])
    report["english_tolerance"] = english_tolerance
    report["base_scale"] = base_scale
    return OffsetStats(direction=d, log_continuation=b, scale=float(scales[best]), report=report,
                       base_log_share=a if d_lang is not None else None, language_direction=d_lang,
                       base_scale=base_scale)


def default_calibration_text(turkish_chars: int = 40_000, english_chars: int = 12_000, seed: int = 0,
                             sources: Sequence[str] | None = None):
    """Calibration text from the offline assets: a source-balanced sample of the Turkish *training*
    split (never the validation split; ``sources``: a subset of its sources) and the last documents of
    the English file (the evaluation uses its first ones).
    Returns ``(turkish_docs, english_docs, all_turkish_training_docs)``."""
    import random

    from trkit import assets

    rng = random.Random(seed)
    sample, every = [], []
    files = {k: v for k, v in assets.corpus_files().items() if sources is None or k in sources}
    for name in sorted(files):
        lines = [line for line in files[name].read_text(encoding="utf-8").splitlines() if line.strip()]
        every.extend(lines)
        rng.shuffle(lines)
        got = 0
        for line in lines:
            if got >= turkish_chars // len(files):
                break
            sample.append(line[:2000])
            got += len(sample[-1])
    english, got = [], 0
    for doc in reversed(assets.english_file().read_text(encoding="utf-8").splitlines()):
        if got >= english_chars:
            break
        if doc.strip():
            english.append(doc[:2000])
            got += len(english[-1])
    return sample, english, every


def _tensors_equal(path_a: Path, key_a: str, path_b: Path, key_b: str, chunk_rows: int = CHUNK_ROWS * 4) -> bool:
    """Whether two 2-D tensors of safetensors files hold the same bytes (read in row chunks)."""
    ha, sa = read_safetensors_header(path_a)
    hb, sb = read_safetensors_header(path_b)
    ia, ib = ha[key_a], hb[key_b]
    if ia["shape"] != ib["shape"] or ia["dtype"] != ib["dtype"]:
        return False
    row_bytes = (ia["data_offsets"][1] - ia["data_offsets"][0]) // max(1, ia["shape"][0])
    step = max(1, chunk_rows) * max(1, row_bytes)
    left = ia["data_offsets"][1] - ia["data_offsets"][0]
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        fa.seek(sa + ia["data_offsets"][0])
        fb.seek(sb + ib["data_offsets"][0])
        while left:
            n = min(step, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def plan_checkpoint(src: str | os.PathLike, ext: Extension, *, init: str = DEFAULT_INIT,
                    output_init: str | None = DEFAULT_OUTPUT_INIT) -> dict:
    """What :func:`extend_checkpoint` will do with ``src``, decided from its files alone (cheap).

    Verifies every shard (:func:`trkit.checkpoints.verify_checkpoint`) and decides whether the
    embeddings are tied **per file**: no ``lm_head.weight`` -> tied; ``lm_head.weight`` stored
    and byte-identical to ``embed_tokens`` (fine-tunes of tied Qwen3-0.6B..4B often save both) ->
    tied; stored and different -> untied, whatever ``tie_word_embeddings`` says (the output is
    written with ``tie_word_embeddings: false``, so loaders that follow the config keep the rows).
    """
    src = Path(src)
    output_init = output_init or init
    verify_checkpoint(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    text_config = config.get("text_config", config)
    wmap, index = weight_map(src)
    in_keys = [k for k in wmap if k.endswith(INPUT_KEY_SUFFIX)]
    if len(in_keys) != 1:
        raise ValueError(f"{src}: expected one '*{INPUT_KEY_SUFFIX}' tensor, found {in_keys or 'none'}")
    in_key = in_keys[0]
    out_key = OUTPUT_KEY if OUTPUT_KEY in wmap else None
    config_tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
    if out_key is None:
        if not config_tied:
            raise ValueError(f"{src}: no {OUTPUT_KEY} in the checkpoint but tie_word_embeddings is false")
        tied, decision = True, f"tied: no {OUTPUT_KEY} stored"
    elif _tensors_equal(src / wmap[in_key], in_key, src / wmap[out_key], out_key):
        tied = True
        decision = f"tied: {OUTPUT_KEY} stored and identical to {in_key}"
    else:
        tied = False
        decision = (f"untied: {OUTPUT_KEY} differs from {in_key}"
                    + (" although config.json says tie_word_embeddings=true (written as false)" if config_tied else ""))
    header, _ = read_safetensors_header(src / wmap[in_key])
    old_rows, hidden = header[in_key]["shape"]
    if old_rows < ext.base_vocab_size:
        raise ValueError(f"{src}: {old_rows} embedding rows for a {ext.base_vocab_size}-token tokenizer; "
                         "the extension does not belong to this checkpoint")
    return {"config": config, "weight_map": wmap, "index": index, "in_key": in_key, "out_key": out_key,
            "tied": tied, "tie_decision": decision, "untie": tied and output_init != init,
            "old_rows": old_rows, "hidden": hidden, "rows": ext.rows(old_rows)}


def extend_checkpoint(
    src: str | os.PathLike,
    ext: Extension | str | os.PathLike,
    out: str | os.PathLike,
    *,
    init: str = DEFAULT_INIT,
    output_init: str | None = DEFAULT_OUTPUT_INIT,
    offsets: OffsetStats | None = None,
    base_tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    link: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    dtype: str | None = None,
) -> dict:
    """Extend a safetensors checkpoint directory without loading the model (see module doc).

    Every input shard is verified first (a truncated shard is an error naming it, never linked into
    the output). Writes ``out`` atomically: the resized shard(s), the untouched shards (hard links
    when possible), the updated index and config, the extended tokenizer and a manifest with every
    file's sha256. ``dtype`` (``bfloat16`` / ``float16`` / ``float32``) stores every floating tensor
    in that dtype (then every shard is rewritten; the offline SmolLM2 is fp32 on disk, its bf16 copy
    is half the size and loses nothing a dequantised Q4 model had). Returns the manifest.
    """
    from trkit.progress import tqdm

    src = resolve_checkpoint(src)
    ext = ext if isinstance(ext, Extension) else load_extension(ext)
    output_init = output_init or init
    _check_methods(init, output_init, offsets)
    check_output(out, inputs=[src, ext.directory, base_tokenizer], overwrite=overwrite)
    check_tokenizer_pair(ext, base_tokenizer or src)
    plan = plan_checkpoint(src, ext, init=init, output_init=output_init)
    config, wmap, index = plan["config"], plan["weight_map"], plan["index"]
    in_key, out_key, tied, untie = plan["in_key"], plan["out_key"], plan["tied"], plan["untie"]
    rows, hidden, old_rows = plan["rows"], plan["hidden"], plan["old_rows"]

    def resized(key: str, from_key: str, method: str, seed_: int, desc: str):
        def build():
            # plain reads into the new matrix (no mmap: mapped pages would count as resident memory)
            new = read_rows_into(src / wmap[from_key], from_key, rows)
            init_new_rows(new, ext, method, seed=seed_, offsets=offsets if key == OUTPUT_KEY else None,
                          progress=progress, desc=desc)
            if key == OUTPUT_KEY and method == "fvt_offset":
                correct_base_rows(new, ext, offsets, progress=progress)
            return new
        return build

    import torch

    from trkit.checkpoints import read_tensor, st_dtype

    if dtype not in (None, "bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    target = getattr(torch, dtype) if dtype else None
    code = st_dtype(torch.empty(0, dtype=target)) if target is not None else None
    floats = ("F64", "F32", "F16", "BF16")

    def cast(name: str, dt: str, build):
        """(stored dtype, producer) of a tensor under the requested output dtype."""
        if code is None or dt not in floats or dt == code:
            return dt, build
        return code, (lambda: build().to(target)) if callable(build) else (
            lambda: read_tensor(build[0], name).to(target))

    changed = {wmap[in_key]} | ({wmap[out_key]} if out_key else set())
    if code is not None:
        changed = set(wmap.values())
    report: dict[str, str] = {}
    with atomic_directory(out, overwrite=overwrite, inputs=[src, ext.directory, base_tokenizer]) as tmp:
        files = sorted(set(wmap.values()))
        for shard in tqdm(files, desc="shards", disable=not progress, unit="file"):
            if shard not in changed:
                report[shard] = link_or_copy(src / shard, tmp / shard, link)
                continue
            hdr, start = read_safetensors_header(src / shard)
            entries = []
            for name, info in sorted(((k, v) for k, v in hdr.items() if k != "__metadata__"),
                                     key=lambda kv: kv[1]["data_offsets"][0]):
                a, b = info["data_offsets"]
                if name == in_key:
                    entries.append((name, [rows, hidden], *cast(name, info["dtype"], resized(in_key, in_key, init, seed, "input rows"))))
                    if untie and out_key is None:
                        entries.append((OUTPUT_KEY, [rows, hidden], *cast(OUTPUT_KEY, info["dtype"],
                                        resized(OUTPUT_KEY, in_key, output_init, seed + 1, "output rows"))))
                elif name == out_key:
                    if tied and not untie:  # a stored copy of the tied matrix stays a copy of it
                        entries.append((name, [rows, hidden], *cast(name, info["dtype"],
                                        resized(in_key, in_key, init, seed, "output rows (tied copy)"))))
                    else:
                        entries.append((name, [rows, hidden], *cast(name, info["dtype"],
                                        resized(OUTPUT_KEY, out_key, output_init, seed + 1, "output rows"))))
                else:
                    entries.append((name, info["shape"], *cast(name, info["dtype"], (src / shard, start + a, start + b))))
            entries = [(n, dt, shape, source) for n, shape, dt, source in entries]
            write_safetensors_streaming(tmp / shard, entries, hdr.get("__metadata__"))
            report[shard] = "rewritten"
        if index is not None:
            new_map = dict(wmap)
            if untie and out_key is None:
                new_map[OUTPUT_KEY] = wmap[in_key]
            total = n_params = 0
            for shard in files:
                hdr, _ = read_safetensors_header(tmp / shard)
                for k, v in hdr.items():
                    if k != "__metadata__":
                        total += v["data_offsets"][1] - v["data_offsets"][0]
                        n_params += math.prod(v["shape"])
            meta = {**index.get("metadata", {}), "total_size": total}
            if "total_parameters" in meta:
                meta["total_parameters"] = n_params
            new_index = dict(index)
            new_index["metadata"] = meta
            new_index["weight_map"] = dict(sorted(new_map.items()))
            (tmp / INDEX_NAME).write_text(json.dumps(new_index, indent=2) + "\n", encoding="utf-8")
        new_config = dict(config)
        targets = [new_config] + ([new_config["text_config"]] if "text_config" in new_config else [])
        for c in targets:
            c["vocab_size"] = rows
            if untie or not tied:
                c["tie_word_embeddings"] = False
            if dtype:
                for key in ("dtype", "torch_dtype"):
                    if key in c or key == "dtype":
                        c[key] = dtype
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for p in sorted(src.iterdir()):  # generation_config.json and other small files
            if (p.is_file() and p.name not in changed and p.name not in report and p.name != "config.json"
                    and p.name != INDEX_NAME and p.name not in TOKENIZER_FILES
                    and p.name != MANIFEST_NAME and not p.name.startswith(".")
                    and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))):
                shutil.copyfile(p, tmp / p.name)
        for name in TOKENIZER_FILES:
            if (ext.directory / name).is_file():
                shutil.copyfile(ext.directory / name, tmp / name)
        if offsets is not None and output_init == "fvt_offset":
            offsets.save(tmp / OFFSET_STATS_NAME)
        manifest = write_manifest(
            tmp, "embed",
            source=str(src), source_config_sha256=sha256_file(src / "config.json"),
            extension=str(ext.directory), extension_manifest_sha256=sha256_file(ext.directory / MANIFEST_NAME),
            base_fingerprint=ext.base_fingerprint, base_vocab_size=ext.base_vocab_size,
            vocab_size=ext.vocab_size, rows=rows, old_rows=old_rows,
            init=init, output_init=output_init, seed=seed, tied=tied and not untie, untied=untie, dtype=dtype,
            source_tied=tied, tie_decision=plan["tie_decision"],
            offset_stats=None if offsets is None else {"scale": offsets.scale, **offsets.report},
            shards=report,
        )
    return manifest


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit embed --model NAME_OR_DIR --tokenizer DIR --init fvt --out DIR
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint dir, hub name, or offline alias (smollm2, qwen3-tiny)")
    parser.add_argument("--tokenizer", required=True, help="the extended tokenizer dir written by `trkit vocab`")
    parser.add_argument("--out", required=True, help="output checkpoint dir")
    parser.add_argument("--init", choices=INPUT_INITS, default=DEFAULT_INIT, help="input rows (default fvt)")
    parser.add_argument("--output-init", choices=OUTPUT_INITS, default=DEFAULT_OUTPUT_INIT,
                        help="output rows (default fvt_offset; a tied model is untied unless it equals --init)")
    parser.add_argument("--base-tokenizer", help="the checkpoint's tokenizer dir if it is not inside the checkpoint")
    parser.add_argument("--offset-stats", help=f"reuse a {OFFSET_STATS_NAME} (written beside an earlier output) instead of calibrating")
    parser.add_argument("--calibration", nargs="+", metavar="FILE",
                        help="Turkish calibration text, one document per line (default: a sample of the offline "
                             "training corpus); tokens are counted on it too")
    parser.add_argument("--english", nargs="+", metavar="FILE",
                        help="English calibration text (default: the last documents of the offline English file)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random rule")
    parser.add_argument("--copy", action="store_true", help="copy untouched shards instead of hard-linking them")
    parser.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"),
                        help="store the output's floating tensors in this dtype (default: as the source stores them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--profile", default="auto", help="hardware profile of the calibration pass (auto | cpu | t4 | a100 | gpu)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="dtype of the calibration pass (auto: the profile's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    import gc

    # Every path and option is checked before the calibration pass (minutes on an 8B model).
    src = resolve_checkpoint(args.model)
    ext = load_extension(args.tokenizer)
    base_tok_dir = Path(args.base_tokenizer) if args.base_tokenizer else src
    check_output(args.out, inputs=[src, ext.directory, args.base_tokenizer, args.offset_stats,
                                   *(args.calibration or []), *(args.english or [])], overwrite=args.overwrite)
    check_tokenizer_pair(ext, base_tok_dir)
    plan_checkpoint(src, ext, init=args.init, output_init=args.output_init)  # verifies every shard
    for f in [*(args.calibration or []), *(args.english or []), *([args.offset_stats] if args.offset_stats else [])]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such file")
    offsets = None
    if args.output_init == "fvt_offset":
        if args.offset_stats:
            offsets = OffsetStats.load(args.offset_stats)
        else:
            from trkit.evaluation import read_documents
            from trkit.loading import load_model, load_tokenizer

            turkish, english, count_docs = default_calibration_text()
            if args.calibration:
                turkish = count_docs = [d for f in args.calibration for d in read_documents(f)]
            if args.english:
                english = [d for f in args.english for d in read_documents(f)]
            model, base_tok = load_model(src, args.profile, tokenizer=base_tok_dir,
                                         dtype=None if args.dtype == "auto" else args.dtype)
            offsets = estimate_offset_stats(
                model, ext, base_tok, load_tokenizer(ext.directory),
                turkish, english, count_documents=count_docs, init=args.init, progress=not args.quiet)
            del model
            gc.collect()
            print(f"fvt_offset: scale {offsets.scale}, h.d = {offsets.report['direction_fit_mean']:.3f} "
                  f"+- {offsets.report['direction_fit_std']:.3f}; base rows scale {offsets.base_scale}", file=sys.stderr)
    manifest = extend_checkpoint(src, ext, args.out, init=args.init, output_init=args.output_init, offsets=offsets,
                                 base_tokenizer=base_tok_dir, seed=args.seed, link=not args.copy,
                                 overwrite=args.overwrite, progress=not args.quiet, dtype=args.save_dtype)
    print(f"wrote {args.out}: {manifest['old_rows']} -> {manifest['rows']} rows "
          f"(vocabulary {manifest['base_vocab_size']} -> {manifest['vocab_size']}), input {manifest['init']}, "
          f"output {manifest['output_init']}{' (untied)' if manifest['untied'] else ''}; {manifest['tie_decision']}")
    return 0
