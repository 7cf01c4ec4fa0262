"""Knowledge distillation from an offline teacher cache, exact across an extended vocabulary.

What it does. A free T4 cannot hold a teacher beside an 8B student, so the teacher runs once, alone
(``python -m trkit distill cache``, :func:`cache_teacher_logits`), over the training text **tokenised
with its own tokenizer**, in the same document order the training stage reads
(:func:`trkit.packing.document_stream`, same corpus / seed / ``--max-documents``), and writes per
teacher position ``p`` (the distribution of the token after ``p``, temperature 1):

* the top-k token ids and their log-probabilities ``log p_T(o | <=p)``, normalised over the
  tokenizer's ``len(tokenizer)`` ids (embedding padding rows are never produced by the tokenizer and
  are left out), sorted, fp16;
* the log-probability of the realised next token and the log of the remaining mass
  ``log sum_{o not in topk} p_T(o)`` (fp16; summed directly in fp32, since ``1 - sum_topk`` loses a
  small remainder, which matters once it is tempered);
* the token's UTF-8 byte length (0 for the document separator), from which its document and end byte
  (``trkit.packing.Packed.doc`` / ``end_byte``) are rebuilt exactly.

Compact: ids take ``ceil(log2 len(tokenizer))`` bits (18 for Qwen3's 151,669), a log-probability is
<= 0 so its fp16 sign bit is dropped (15 bits, lossless: decoding gives the same fp16 value), all bit
fields of a position are packed into one little-endian byte record. Qwen3, k = 32:
32 x 18 + 34 x 15 = 1086 bits = 136 B + 1 B byte length = **137 B per position** (int32 ids + fp16
log-probs would be 192). Shards are safetensors files (``records`` uint8 n x R, ``lengths``,
``piece_doc`` / ``piece_end`` int32) with a JSON sidecar (sha256, positions); the directory holds the
plan (``trkit_cache_plan.json``: teacher identity and tokenizer fingerprint, k, window, text hash
``Documents.sha256``, layout, shards), the teacher's tokenizer and, once complete, the manifest.
Resumable: a shard whose file or hash does not match its sidecar is (re)computed, finished ones are
skipped; every shard's bytes depend only on the plan, so a resumed cache is byte-identical to an
uninterrupted one (the manifest differs only in its ``created`` time).

Teacher context. The teacher reads the stream in pieces of ``--stride`` tokens; piece ``q`` is
predicted by a window of the ``seq_len / stride`` pieces ending with it (``--stride`` = ``--seq-len``,
the default: plain blocks, each position's history starts at its block), so every stored position
has at least ``seq_len - stride`` tokens of history. The student packs the same stream with its own
(extended, coarser) tokenizer into its own blocks; a student position whose teacher history starts
later in the stream than the student block (the teacher saw less text) is **masked** from the KD
term and counted (``kd/masked``: share of labelled positions). A student block of S tokens spans
about S x (teacher tokens per student token) teacher tokens (SmolLM2 + 20k Turkish tokens: ~2.3), so
``seq_len - stride`` >= that keeps masking near zero; :meth:`DistillLoss.from_cache` prints the share.

Losses (per labelled student position i; ``w`` = ``--kd-weight``, ``T`` = ``--kd-temperature``)::

    loss_i = (1 - w) CE_i + w (T^2 KL_i + lambda B_i)      KD available at i
    loss_i = CE_i                                           masked (no teacher with enough history)

* Alignment: i (its token's document and end byte) is matched with the teacher position j(i) with
  the same (document, end byte). An extension only merges, so every student boundary is a teacher
  boundary and j(i) always exists; the teacher at j(i) predicts the first base piece of the student's
  next token.
* Mapping (extended student): the student's next-token distribution over its full vocabulary goes to
  the teacher vocabulary by **first constituent**, ``p~_S(o) = sum_{t: first(t) = o} p_S(t)`` (base
  ids map to themselves, new ids to the first id of their merge tree, :func:`vocabulary_map`);
  embedding padding rows map to no teacher token. Computed in log space (grouped logsumexp, one
  ``scatter_add``) from each chunk of the chunked loss (:func:`trkit.losses.chunked_head_loss`), so
  full-vocabulary fp32 logits never exist at once.
* ``--kd-mode rest`` (default): the KL of the (k + 1)-outcome coarsening, the teacher's top-k ids and
  one "rest" bucket: ``KL = sum_{o in topk + rest} q(o) log(q(o) / s(o))`` with ``q`` the stored
  teacher values (renormalised: fp16 rounding) and ``s`` the student's mapped mass on the same k ids
  and, summed directly (a masked logsumexp), on everything else; at
  ``T != 1`` both (k + 1)-vectors are tempered (``softmax(log v / T)``: the teacher's tail is not
  stored, so temperature is applied after coarsening, on both sides alike). A proper KL: >= 0, and 0
  when the student is the teacher, at every T.
* ``--kd-mode renormalized``: the usual sparse top-k KD: teacher top-k renormalised and tempered,
  ``q = softmax(log p_T(topk) / T)``, student ``log_softmax(z / T)`` over its full vocabulary, mapped;
  ``KL = sum_{o in topk} q(o) (log q(o) - log p~_S^T(o))`` (minimised by putting all mass on the
  teacher's top-k; at student = teacher it equals ``-log`` of the tempered top-k mass, not 0).
* Chain term (``--kd-chain-weight lambda``, extended student, default off): when the realised next
  student token t is new with base constituents c_1..c_m, the teacher's realised log-probabilities at
  j(i) .. j(i)+m-1 give ``a = p_T(c_1..c_m)`` (chain rule); ``B_i`` is the Bernoulli KL
  ``a log(a/b) + (1-a) log((1-a)/(1-b))`` with ``b = p_S(t)``. An approximation: ``p_T(c_1..c_m)`` also
  counts continuations the student would write with a longer new token.
* ``--kd-mode uld`` (a teacher of another tokenizer family, e.g. GPT-OSS-20B): Universal Logit
  Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs"): ``sum_r |p_S^(r) - p_T^(r)|`` over the probabilities sorted in
  decreasing order (top-k), plus ``|rest_S - rest_T|`` for the tails (a lower bound of the paper's
  full-vocabulary L1, which needs the whole teacher distribution), at positions where both
  tokenizations have a boundary at the same byte. It ignores which token is which: a warning says so.
  Refused at T != 1 (the paper's loss has no temperature).

A teacher whose tokenizer is neither the student's nor the base of the student's extension is refused
unless ``--kd-mode uld`` is asked for; a cache of other text (stream hash) is refused. The KD loss
is a pure function of the cache and the batch, so a resumed run needs no extra state.
Sources: Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network", the T^2 scaling);
sparse top-k logit caches as in DistillKit (arcee-ai); the first-constituent mapping, the byte-offset
alignment and the exactness check (student = teacher + new rows with -inf logits => KL 0 at every
position whose context has no new token; tests/test_distill.py) are this project's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

PLAN_NAME = "trkit_cache_plan.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "teacher_tokenizer"
CACHE_STAGE = "distill-cache"
CACHE_FORMAT = 1
LOGPROB_BITS = 15  # fp16 without its sign bit (log-probabilities are <= 0)
KD_MODES = ("rest", "renormalized", "uld")
DEFAULT_SHARD_POSITIONS = 1 << 16


# --------------------------------------------------------------------------------------------
# Compact records: bit-packed ids, sign-less fp16 log-probabilities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The bit layout of one position's record: k ids, k log-probs, realised, rest (little-endian bits)."""

    k: int
    id_bits: int
    length_bits: int

    @property
    def record_bits(self) -> int:
        return self.k * self.id_bits + (self.k + 2) * LOGPROB_BITS

    @property
    def record_bytes(self) -> int:
        return -(-self.record_bits // 8)

    @property
    def length_dtype(self):
        return np.uint8 if self.length_bits <= 8 else np.uint16

    @property
    def bytes_per_position(self) -> int:
        return self.record_bytes + np.dtype(self.length_dtype).itemsize

    def to_dict(self) -> dict:
        return {"k": self.k, "id_bits": self.id_bits, "logprob_bits": LOGPROB_BITS, "length_bits": self.length_bits,
                "record_bytes": self.record_bytes, "bytes_per_position": self.bytes_per_position,
                "fields": ["top-k ids", "top-k log-probs", "realised log-prob", "rest log-mass"]}

    @classmethod
    def for_vocabulary(cls, k: int, vocab_size: int, max_token_bytes: int) -> "Layout":
        return cls(k, max(1, math.ceil(math.log2(vocab_size))), max(1, math.ceil(math.log2(max_token_bytes + 1))))


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    v = values.astype(np.uint32)
    return ((v[..., None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8).reshape(v.shape[0], -1)


def _unbits(bits: np.ndarray, width: int) -> np.ndarray:
    n = bits.shape[0]
    weights = (1 << np.arange(width, dtype=np.int64))
    return bits.reshape(n, -1, width).astype(np.int64) @ weights


def _logprob_magnitude(x: np.ndarray) -> np.ndarray:
    """fp16 bits of log-probabilities (<= 0) without the sign bit: lossless for the fp16 value."""
    h = np.minimum(x.astype(np.float32), 0.0).astype(np.float16).view(np.uint16)
    return h & 0x7FFF


def _logprob_value(mag: np.ndarray) -> np.ndarray:
    return (mag.astype(np.uint16) | 0x8000).view(np.float16).astype(np.float32)


def pack_records(layout: Layout, ids: np.ndarray, logprobs: np.ndarray, realised: np.ndarray,
                 rest: np.ndarray) -> np.ndarray:
    """(n, record_bytes) uint8 records of n positions (ids n x k, log-probs n x k, realised n, rest n)."""
    if ids.size and (int(ids.max()) >= 1 << layout.id_bits or int(ids.min()) < 0):
        raise ValueError(f"token id out of the {layout.id_bits}-bit range")
    fields = [_bits(ids, layout.id_bits), _bits(_logprob_magnitude(logprobs), LOGPROB_BITS),
              _bits(_logprob_magnitude(realised[:, None]), LOGPROB_BITS),
              _bits(_logprob_magnitude(rest[:, None]), LOGPROB_BITS)]
    return np.packbits(np.concatenate(fields, axis=1), axis=1, bitorder="little")


def unpack_records(layout: Layout, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int64 n x k, log-probs float32 n x k, realised n, rest n)`` of packed records."""
    bits = np.unpackbits(np.ascontiguousarray(records), axis=1, count=layout.record_bits, bitorder="little")
    a = layout.k * layout.id_bits
    b = a + layout.k * LOGPROB_BITS
    ids = _unbits(bits[:, :a], layout.id_bits)
    lps = _logprob_value(_unbits(bits[:, a:b], LOGPROB_BITS))
    realised = _logprob_value(_unbits(bits[:, b : b + LOGPROB_BITS], LOGPROB_BITS))[:, 0]
    rest = _logprob_value(_unbits(bits[:, b + LOGPROB_BITS :], LOGPROB_BITS))[:, 0]
    return ids, lps, realised, rest


def rebuild_offsets(lengths: np.ndarray, piece_doc: np.ndarray, piece_end: np.ndarray,
                    stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position ``(document, end byte)`` from byte lengths (0 = document separator) and each piece's
    first document and end byte: the same arrays :func:`trkit.packing.pack_text` records."""
    L = lengths.reshape(-1, stride).astype(np.int64)
    sep = L == 0
    col = np.arange(stride)
    doc = piece_doc[:, None].astype(np.int64) + np.cumsum(sep, axis=1) - sep[:, :1]
    last = np.maximum.accumulate(np.where(sep & (col > 0), col, 0), axis=1)
    csum = np.cumsum(L, axis=1)
    base = np.where(last > 0, 0, piece_end[:, None].astype(np.int64))
    end = base + csum - np.take_along_axis(csum, last, axis=1)
    return doc.reshape(-1), end.reshape(-1)


def _key(doc: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (np.asarray(doc, dtype=np.int64) << 32) | np.asarray(offset, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The teacher pass: python -m trkit distill cache
# --------------------------------------------------------------------------------------------


def _tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _teacher_identity(name: str, path: Path) -> dict:
    from trkit.artifacts import sha256_file

    weights = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    return {"name": str(name), "path": str(path), "config_sha256": sha256_file(path / "config.json"),
            "weight_files": {p.name: p.stat().st_size for p in weights}}


def _plan_identity(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k not in ("shards", "positions", "bytes")}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _shard_done(out: Path, shard: dict) -> bool:
    """True when a shard's file exists and hashes to what its sidecar recorded for this plan's shard."""
    from trkit.artifacts import sha256_file

    f = out / SHARD_DIR / shard["file"]
    side = _sidecar(f)
    if not f.is_file() or not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if any(meta.get(k) != shard[k] for k in ("file", "first_piece", "pieces", "positions")):
        return False
    return meta.get("sha256") == sha256_file(f)


def plan_cache(teacher: str, corpus: Sequence[str], out: str | os.PathLike, *, top_k: int = 32,
               seq_len: int | None = None, stride: int | None = None, seed: int = 0,
               max_documents: int | None = None, text_field: str = "text", profile: Any = "auto",
               dtype: str | None = None, batch_size: int | None = None,
               shard_positions: int = DEFAULT_SHARD_POSITIONS, progress: bool = False):
    """Check everything and compute the plan without loading the teacher's weights.

    Returns ``(plan, pieces, tokenizer, profile)``; ``plan['bytes']`` is the Drive space the cache will take.
    """
    from trkit.loading import load_tokenizer, resolve
    from trkit.packing import document_stream, pack_text, token_byte_lengths
    from trkit.profiles import Profile, get_profile
    from trkit.vocab import tokenizer_fingerprint

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    seq_len = seq_len or prof.max_seq_len
    stride = stride or seq_len
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len or seq_len % stride:
        raise ValueError(f"--stride must divide --seq-len ({seq_len}) and be at most it, got {stride}")
    path = resolve(teacher)
    tok = load_tokenizer(path)
    vocab = len(tok)
    if top_k > vocab:
        raise ValueError(f"--top-k {top_k} is more than the teacher's {vocab} tokens")
    lengths = token_byte_lengths(tok)
    layout = Layout.for_vocabulary(top_k, vocab, int(lengths.max()))
    docs = document_stream(corpus, seed=seed, kind="text", text_field=text_field, max_documents=max_documents)
    if len(docs) == 0:
        raise ValueError(f"the corpus {list(corpus)} holds no documents")
    pieces = pack_text(tok, docs, stride, progress=progress)
    n_pieces = len(pieces)
    per_shard = max(1, shard_positions // stride)
    shards = [{"file": _shard_name(i), "first_piece": lo, "pieces": min(per_shard, n_pieces - lo),
               "positions": min(per_shard, n_pieces - lo) * stride}
              for i, lo in enumerate(range(0, n_pieces, per_shard))]
    positions = n_pieces * stride
    windows = seq_len // stride
    plan = {
        "format": CACHE_FORMAT,
        "teacher": _teacher_identity(teacher, path),
        "tokenizer_fingerprint": tokenizer_fingerprint(_tokenizer_json(tok)),
        "vocab_size": vocab,
        "separator_id": int(pieces.stats["separator_id"]),
        "top_k": top_k, "seq_len": seq_len, "stride": stride, "window_pieces": windows,
        "text_sha256": docs.sha256, "corpus": [str(c) for c in corpus], "seed": seed, "max_documents": max_documents,
        "text_field": text_field, "documents": len(docs), "misaligned_documents": pieces.stats["misaligned_documents"],
        "dropped_tail_tokens": pieces.stats["dropped_tail_tokens"],
        "dtype": dtype or prof.dtype, "load_in_4bit": bool(prof.load_in_4bit), "device": prof.device,
        "batch_size": batch_size or prof.batch_size,
        "layout": layout.to_dict(),
        "positions": positions,
        "forward_tokens": sum(min(q + 1, windows) * stride for q in range(n_pieces)),
        "bytes": positions * layout.bytes_per_position + n_pieces * 8,
        "shards": shards,
    }
    return plan, pieces, tok, prof


def describe_plan(plan: dict) -> str:
    b = plan["bytes"]
    size = f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    return (f"teacher cache plan: {plan['positions']:,} positions x {plan['layout']['bytes_per_position']} B = {size} "
            f"in {len(plan['shards'])} shard(s) (top-{plan['top_k']}, {plan['layout']['id_bits']}-bit ids); teacher "
            f"forward over {plan['forward_tokens']:,} tokens (windows of {plan['seq_len']}, stride {plan['stride']}: "
            f">= {plan['seq_len'] - plan['stride']} tokens of history per position), {plan['dtype']}"
            f"{' NF4' if plan['load_in_4bit'] else ''} on {plan['device']}")


@dataclass
class CacheResult:
    out: Path
    positions: int
    computed_positions: int
    seconds: float
    shards_computed: int
    shards_skipped: int
    bytes: int
    plan: dict = field(repr=False, default_factory=dict)

    @property
    def positions_per_s(self) -> float:
        return self.computed_positions / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(1, self.positions)


def cache_teacher_logits(teacher: str, corpus: Sequence[str] | str, out: str | os.PathLike, *, top_k: int = 32,
                         seq_len: int | None = None, stride: int | None = None, seed: int = 0,
                         max_documents: int | None = None, text_field: str = "text", profile: Any = "auto",
                         dtype: str | None = None, batch_size: int | None = None,
                         shard_positions: int = DEFAULT_SHARD_POSITIONS, chunk: int = 1024,
                         overwrite: bool = False, progress: bool = True, plan_only: bool = False) -> CacheResult:
    """Run the teacher over the stream and write (or finish) the cache in ``out`` (see the module doc)."""
    import torch
    from trkit.progress import tqdm

    from trkit import artifacts
    from trkit.options import check_output

    corpus = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    out = Path(out)
    check_output(out, inputs=[teacher, *[c for c in corpus if c != "default"]], overwrite=True,
                 require_manifest=False)
    existing = None
    if out.is_dir() and any(out.iterdir()):
        if not (out / PLAN_NAME).is_file():
            raise ValueError(f"--out {out} exists and is not a trkit teacher cache (no {PLAN_NAME}): refusing to write "
                             "into it; choose another --out")
        existing = json.loads((out / PLAN_NAME).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    plan, pieces, tok, prof = plan_cache(teacher, corpus, out, top_k=top_k, seq_len=seq_len, stride=stride, seed=seed,
                                         max_documents=max_documents, text_field=text_field, profile=profile,
                                         dtype=dtype, batch_size=batch_size, shard_positions=shard_positions,
                                         progress=progress)
    print(describe_plan(plan), file=sys.stderr)
    if existing is not None and existing != plan:
        mine, theirs = _plan_identity(plan), _plan_identity(existing)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)) or ["shards"]
        if not overwrite:
            raise ValueError(f"--out {out} holds a teacher cache with other settings ({', '.join(diff)} differ): rerun "
                             "with its own settings to finish it, choose another --out, or pass --overwrite to start again")
        existing = None
        shutil.rmtree(out)
    if plan_only:
        return CacheResult(out, plan["positions"], 0, 0.0, 0, 0, plan["bytes"], plan)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.sweep_stale(out, None)
    artifacts.sweep_stale(out / SHARD_DIR, None)
    if existing is None:
        artifacts.atomic_write_json(out / PLAN_NAME, plan)
    if not (out / TOKENIZER_DIR / "tokenizer.json").is_file():
        with artifacts.atomic_directory(out / TOKENIZER_DIR, overwrite=True, require_manifest=False) as tmp:
            tok.save_pretrained(str(tmp))
    todo = [s for s in plan["shards"] if not _shard_done(out, s)]
    skipped = len(plan["shards"]) - len(todo)
    if skipped:
        print(f"[trkit distill] {skipped} of {len(plan['shards'])} shard(s) already done and verified", file=sys.stderr)
    computed = 0
    if todo:
        from trkit.loading import load_model
        from trkit.packing import token_byte_lengths

        model, _ = load_model(teacher, prof, dtype=plan["dtype"])
        layout = Layout(plan["top_k"], plan["layout"]["id_bits"], plan["layout"]["length_bits"])
        lengths = token_byte_lengths(tok)
        stream = pieces.input_ids.reshape(-1).astype(np.int64)
        ends = pieces.end_byte.reshape(-1)
        bar = tqdm(total=sum(s["positions"] for s in todo), desc="teacher", unit="tok", unit_scale=True,
                   disable=not progress, dynamic_ncols=True, mininterval=1.0)
        t_compute = time.perf_counter()
        for shard in todo:
            _compute_shard(model, plan, layout, shard, stream, ends, lengths, out, chunk, bar)
            computed += shard["positions"]
        bar.close()
        del model
        if prof.device == "cuda":
            torch.cuda.empty_cache()
        compute_seconds = time.perf_counter() - t_compute
    else:
        compute_seconds = 0.0
    manifest_path = out / artifacts.MANIFEST_NAME
    if todo or not manifest_path.is_file():
        artifacts.write_manifest(out, CACHE_STAGE, teacher=plan["teacher"]["name"],
                                 tokenizer_fingerprint=plan["tokenizer_fingerprint"], top_k=plan["top_k"],
                                 seq_len=plan["seq_len"], stride=plan["stride"], text_sha256=plan["text_sha256"],
                                 positions=plan["positions"], layout=plan["layout"],
                                 shards={s["file"]: json.loads(_sidecar(out / SHARD_DIR / s["file"]).read_text())
                                         for s in plan["shards"]})
    size = sum((out / SHARD_DIR / s["file"]).stat().st_size for s in plan["shards"])
    return CacheResult(out, plan["positions"], computed, compute_seconds if todo else time.perf_counter() - t0,
                       len(todo), skipped, size, plan)


def _compute_shard(model, plan: dict, layout: Layout, shard: dict, stream: np.ndarray, ends: np.ndarray,
                   lengths: np.ndarray, out: Path, chunk: int, bar) -> None:
    """One shard: every piece q predicted by the window of pieces ``max(0, q-m+1) .. q``; written atomically."""
    import torch
    from safetensors.numpy import save_file

    from trkit import artifacts

    s, m, V, bs = plan["stride"], plan["window_pieces"], plan["vocab_size"], plan["batch_size"]
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    q_lo, q_hi = shard["first_piece"], shard["first_piece"] + shard["pieces"]
    # windows of equal length are batched; the first m-1 pieces of the stream have shorter windows
    groups: list[list[int]] = []
    for q in range(q_lo, q_hi):
        if q < m - 1 or not groups or len(groups[-1]) == bs or groups[-1][0] < m - 1:
            groups.append([q])
        else:
            groups[-1].append(q)
    records, lens = [], []
    n_stream = len(stream)
    for group in groups:
        starts = [max(0, q - m + 1) * s for q in group]
        width = (group[0] + 1) * s - starts[0]
        ids = torch.from_numpy(np.stack([stream[a : a + width] for a in starts])).to(device)
        with torch.inference_mode():
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, -s:]
            flat = hidden.reshape(-1, hidden.shape[-1])
            pos = np.concatenate([np.arange(q * s, (q + 1) * s) for q in group])
            nxt = np.where(pos + 1 < n_stream, stream[np.minimum(pos + 1, n_stream - 1)], 0)
            has_next = torch.from_numpy(pos + 1 < n_stream).to(device)
            nxt_t = torch.from_numpy(nxt).to(device)
            for lo in range(0, flat.shape[0], chunk):
                z = head(flat[lo : lo + chunk]).float()[:, :V]  # the tokenizer's ids (no padding rows)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                top = z.topk(layout.k, dim=-1)
                top_lp = (top.values - lse).clamp_max(0.0)
                realised = (z.gather(1, nxt_t[lo : lo + chunk, None]) - lse).squeeze(1).clamp_max(0.0)
                realised = torch.where(has_next[lo : lo + chunk], realised, torch.full_like(realised, -math.inf))
                # the mass outside the top-k, summed directly (1 - sum(top) loses it when it is tiny)
                rest = (torch.logsumexp(z.scatter_(1, top.indices, -math.inf), dim=-1) - lse[:, 0]).clamp_max(0.0)
                records.append(pack_records(layout, top.indices.cpu().numpy(), top_lp.cpu().numpy(),
                                            realised.cpu().numpy(), rest.cpu().numpy()))
        lens.append(np.where(ends[pos] == 0, 0, lengths[stream[pos]]).astype(layout.length_dtype))
        bar.update(len(pos))
    piece_first = np.arange(q_lo, q_hi) * s
    tensors = {"records": np.concatenate(records), "lengths": np.concatenate(lens),
               "piece_doc": piece_documents(ends, piece_first),
               "piece_end": ends[piece_first].astype(np.int32)}
    path = out / SHARD_DIR / shard["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        # one metadata key: safetensors writes a metadata map in hash order, which differs between processes
        save_file(tensors, str(tmp), metadata={"trkit": json.dumps({"format": CACHE_FORMAT, "first_piece": q_lo})})
    artifacts.atomic_write_json(_sidecar(path), {**{k: shard[k] for k in ("file", "first_piece", "pieces", "positions")},
                                                 "sha256": artifacts.sha256_file(path)})


def piece_documents(ends: np.ndarray, piece_first: np.ndarray) -> np.ndarray:
    """Document index of each piece's first token: separators (end byte 0) counted up to it."""
    seps = np.cumsum(ends == 0)  # documents started so far (every document starts with its separator)
    return (seps[piece_first] - 1).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Reading a cache
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """A complete teacher cache: the position index in memory, the records memory-mapped.

    ``keys[p]`` = (document << 32) | end byte of teacher position p (strictly increasing),
    ``starts[p]`` = the same for where the token starts (separator: 0), ``history_start(p)`` = the
    start key of the first token the teacher saw when predicting after p.
    """

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True):
        from safetensors import safe_open

        from trkit.artifacts import read_manifest, sha256_file
        from trkit.checkpoints import read_safetensors_header

        self.directory = Path(directory)
        if not (self.directory / "trkit_manifest.json").is_file():
            if (self.directory / PLAN_NAME).is_file():
                raise ValueError(f"{self.directory} is an unfinished teacher cache: rerun the same `python -m trkit "
                                 "distill cache` command to finish it (finished shards are kept)")
            raise FileNotFoundError(f"{self.directory} is not a teacher cache (no trkit_manifest.json): build one with "
                                    "`python -m trkit distill cache --teacher ... --out DIR`")
        self.manifest = read_manifest(self.directory, verify=False)
        if self.manifest.get("stage") != CACHE_STAGE:
            raise ValueError(f"{self.directory} was written by `trkit {self.manifest.get('stage')}`, not "
                             "`trkit distill cache`")
        self.plan = json.loads((self.directory / PLAN_NAME).read_text(encoding="utf-8"))
        lay = self.plan["layout"]
        self.layout = Layout(self.plan["top_k"], lay["id_bits"], lay["length_bits"])
        self.stride, self.window = self.plan["stride"], self.plan["window_pieces"]
        self.vocab_size = self.plan["vocab_size"]
        docs, ends, lens, self._records, self._offsets = [], [], [], [], [0]
        for shard in self.plan["shards"]:
            path = self.directory / SHARD_DIR / shard["file"]
            recorded = self.manifest["files"].get(f"{SHARD_DIR}/{shard['file']}")
            if recorded is None or not path.is_file():
                raise ValueError(f"{path} is missing from the teacher cache: rerun `python -m trkit distill cache` "
                                 "with the same options to redo it")
            if verify and sha256_file(path) != recorded:
                raise ValueError(f"{path} does not match its recorded sha256 (changed or truncated): rerun "
                                 "`python -m trkit distill cache` with the same options; it redoes that shard")
            with safe_open(str(path), framework="numpy") as f:
                length = f.get_tensor("lengths")
                d, e = rebuild_offsets(length, f.get_tensor("piece_doc"), f.get_tensor("piece_end"), self.stride)
            header, start = read_safetensors_header(path)
            info = header["records"]
            a, b = info["data_offsets"]
            self._records.append(np.memmap(path, dtype=np.uint8, mode="r", offset=start + a,
                                           shape=tuple(info["shape"])))
            docs.append(d), ends.append(e), lens.append(length.astype(np.int64))
            self._offsets.append(self._offsets[-1] + len(length))
        doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        length = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.keys = _key(doc, end)
        self.starts = _key(doc, np.where(length == 0, 0, end - length + 1))
        self._offsets = np.asarray(self._offsets)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER_DIR

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Teacher position of each (document, end byte) key, -1 where the teacher has no such boundary."""
        j = np.searchsorted(self.keys, keys)
        jc = np.minimum(j, max(0, len(self) - 1))
        ok = (j < len(self)) & (self.keys[jc] == keys) if len(self) else np.zeros(keys.shape, bool)
        return np.where(ok, j, -1)

    def history_start(self, j: np.ndarray) -> np.ndarray:
        first = np.maximum(0, j // self.stride - self.window + 1) * self.stride
        return self.starts[first]

    def records(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decoded records of positions ``j`` (all valid indices)."""
        shard = np.searchsorted(self._offsets, j, side="right") - 1
        rec = np.empty((len(j), self.layout.record_bytes), dtype=np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            rec[sel] = self._records[s][j[sel] - self._offsets[s]]
        return unpack_records(self.layout, rec)

    def summary(self) -> dict:
        size = sum(self.manifest["sizes"].get(f"{SHARD_DIR}/{s['file']}", 0) for s in self.plan["shards"])
        return {"directory": str(self.directory), "teacher": self.plan["teacher"]["name"],
                "tokenizer_fingerprint": self.plan["tokenizer_fingerprint"], "top_k": self.plan["top_k"],
                "seq_len": self.plan["seq_len"], "stride": self.plan["stride"], "positions": len(self),
                "bytes": size, "bytes_per_position": size / max(1, len(self)), "shards": len(self.plan["shards"]),
                "text_sha256": self.plan["text_sha256"], "corpus": self.plan["corpus"], "seed": self.plan["seed"],
                "max_documents": self.plan["max_documents"], "dtype": self.plan["dtype"]}


# --------------------------------------------------------------------------------------------
# Student vocabulary -> teacher vocabulary
# --------------------------------------------------------------------------------------------


@dataclass
class VocabularyMap:
    """How student rows map onto teacher ids: ``same`` (ids < teacher size map to themselves), ``extended``
    (plus new ids ``new_lo .. new_hi-1`` to ``first[t - new_lo]``) or ``foreign`` (ULD only). Rows that
    map to nothing (embedding padding) count as mass outside every teacher token."""

    kind: str
    teacher_size: int
    new_lo: int = 0
    new_hi: int = 0
    first: np.ndarray | None = None  # first base constituent of each new id
    lengths: np.ndarray | None = None  # number of base constituents of each new id


def _constituents_from_merges(student_tj: dict, teacher_tj: dict) -> dict[int, list[int]] | None:
    """New id -> teacher ids, when the student's tokenizer appends merges to the teacher's (else None)."""
    from trkit.embeddings import _full_vocab
    from trkit.vocab import _merge_pair

    s_vocab, t_vocab = _full_vocab(student_tj), _full_vocab(teacher_tj)
    if any(s_vocab.get(t) != i for t, i in t_vocab.items()):
        return None
    t_merges = [tuple(_merge_pair(m)) for m in teacher_tj["model"].get("merges") or []]
    s_merges = [tuple(_merge_pair(m)) for m in student_tj["model"].get("merges") or []]
    if s_merges[: len(t_merges)] != t_merges:
        return None
    base = len(t_vocab)
    out: dict[int, list[int]] = {}
    for left, right in s_merges[len(t_merges):]:
        i = s_vocab.get(left + right)
        if i is None or i < base or i in out:
            continue
        parts = []
        for side in (left, right):
            j = s_vocab[side]
            parts.extend(out[j] if j >= base else [j])
        out[i] = parts
    extra = sorted(i for t, i in s_vocab.items() if t not in t_vocab)
    return out if sorted(out) == extra and extra == list(range(base, base + len(extra))) else None


def _extension_dir(candidates: Sequence[str | os.PathLike | None]) -> Path | None:
    """A ``trkit vocab`` directory: a candidate itself, or the ``extension`` an embed manifest names."""
    for c in candidates:
        if c is None or not Path(c).is_dir():
            continue
        mpath = Path(c) / "trkit_manifest.json"
        if not mpath.is_file():
            continue
        m = json.loads(mpath.read_text(encoding="utf-8"))
        if m.get("stage") == "vocab":
            return Path(c)
        if m.get("stage") == "embed" and m.get("extension") and (Path(m["extension"]) / "trkit_manifest.json").is_file():
            return Path(m["extension"])
    return None


def vocabulary_map(student_tokenizer, student_rows: int, teacher_tokenizer_dir: str | os.PathLike,
                   extension_candidates: Sequence[str | os.PathLike | None] = ()) -> VocabularyMap:
    """Compare the student's tokenizer with the teacher's and build the first-constituent map.

    ``same``: identical tokenizers (fingerprint). ``extended``: the student's tokenizer is the teacher's
    with merges appended (``trkit vocab``); the constituents come from the extension's manifest
    (:func:`trkit.embeddings.load_extension`, found through ``extension_candidates``: the tokenizer dir or
    the embed manifest's ``extension``), else from the appended merges themselves. ``foreign`` otherwise.
    """
    from trkit.vocab import tokenizer_fingerprint

    teacher_tj = json.loads((Path(teacher_tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    student_tj = _tokenizer_json(student_tokenizer)
    t_fp, s_fp = tokenizer_fingerprint(teacher_tj), tokenizer_fingerprint(student_tj)
    from trkit.embeddings import _full_vocab

    t_size = len(_full_vocab(teacher_tj))
    if s_fp == t_fp:
        return VocabularyMap("same", t_size)
    constituents = None
    ext_dir = _extension_dir(extension_candidates)
    if ext_dir is not None:
        from trkit.embeddings import load_extension

        ext = load_extension(ext_dir)
        if ext.base_fingerprint == t_fp and tokenizer_fingerprint(ext_dir) == s_fp:
            constituents = ext.constituents
    if constituents is None:
        constituents = _constituents_from_merges(student_tj, teacher_tj)
    if not constituents:
        return VocabularyMap("foreign", t_size)
    lo, hi = min(constituents), max(constituents) + 1
    if lo != t_size or hi > student_rows:
        return VocabularyMap("foreign", t_size)
    first = np.asarray([constituents[i][0] for i in range(lo, hi)], dtype=np.int64)
    count = np.asarray([len(constituents[i]) for i in range(lo, hi)], dtype=np.int64)
    return VocabularyMap("extended", t_size, lo, hi, first, count)


def mapped_log_probs(lp: "torch.Tensor", vmap: VocabularyMap, ids: "torch.Tensor | None" = None,
                     groups: tuple | None = None) -> "torch.Tensor":
    """``log p~_S(o)`` (first-constituent mapping) of student log-probabilities ``lp`` (n x student rows) at
    teacher ids ``ids`` (n x k), or at every teacher id (n x teacher size) when ``ids`` is None.

    Base ids keep their own mass; each new token's mass is added to its first constituent's, as a
    grouped logsumexp over the new columns only (one ``scatter_add``), so no n x vocabulary copy is made
    for ``ids``. ``groups`` = :func:`new_token_groups` (precomputed once per device)."""
    import torch

    V = vmap.teacher_size
    own = lp[:, :V] if ids is None else lp.gather(1, ids)
    if vmap.kind != "extended":
        return own
    uniq, inverse, group_of = groups if groups is not None else new_token_groups(vmap, lp.device)
    new = lp[:, vmap.new_lo : vmap.new_hi]
    g = inverse.expand(new.shape[0], -1)
    with torch.no_grad():  # per-group maximum: a stabiliser only (the result does not depend on it)
        gmax = torch.full((new.shape[0], uniq.numel()), -math.inf, dtype=lp.dtype, device=lp.device)
        gmax = gmax.scatter_reduce(1, g, new, "amax", include_self=True)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    mass = torch.zeros_like(gmax).scatter_add(1, g, torch.exp(new - gmax.gather(1, g)))
    grouped = torch.where(mass > 0, torch.log(mass.clamp_min(1e-38)) + gmax, torch.full_like(mass, -math.inf))
    if ids is None:
        return own.index_copy(1, uniq, torch.logaddexp(own.index_select(1, uniq), grouped))
    gi = group_of[ids]
    extra = torch.where(gi >= 0, grouped.gather(1, gi.clamp_min(0)), torch.full_like(own, -math.inf))
    return torch.logaddexp(own, extra)


def new_token_groups(vmap: VocabularyMap, device) -> tuple:
    """``(base ids some new token starts with, group of each new token, group of each teacher id or -1)``."""
    import torch

    first = torch.from_numpy(vmap.first).to(device)
    uniq, inverse = torch.unique(first, return_inverse=True)
    group_of = torch.full((vmap.teacher_size,), -1, dtype=torch.long, device=device)
    group_of[uniq] = torch.arange(uniq.numel(), device=device)
    return uniq, inverse, group_of


def row_targets(vmap: VocabularyMap, student_rows: int) -> np.ndarray:
    """The teacher id every student row maps to (first constituent), ``teacher_size`` for rows that map to
    no teacher token (embedding padding)."""
    out = np.full(student_rows, vmap.teacher_size, dtype=np.int64)
    n = min(student_rows, vmap.teacher_size)
    out[:n] = np.arange(n)
    if vmap.kind == "extended":
        out[vmap.new_lo : vmap.new_hi] = vmap.first
    return out


def outside_log_mass(lp: "torch.Tensor", ids: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Log of the student's mass on rows whose teacher id (``targets``, :func:`row_targets`) is not among the
    teacher's top-k ``ids``: the "rest" bucket, summed directly (never as 1 - sum, which loses small masses)."""
    import torch

    mark = torch.zeros(lp.shape[0], int(targets.max()) + 1, dtype=torch.bool, device=lp.device)
    mark.scatter_(1, ids, True)
    inside = mark.gather(1, targets.expand(lp.shape[0], -1))
    return torch.logsumexp(lp.masked_fill(inside, -math.inf), dim=1)


# --------------------------------------------------------------------------------------------
# The loss the training stage calls
# --------------------------------------------------------------------------------------------


def _xlogy_ratio(q: "torch.Tensor", log_q: "torch.Tensor", log_s: "torch.Tensor") -> "torch.Tensor":
    """sum q (log q - log s) over the last axis, 0 where q = 0."""
    import torch

    return torch.where(q > 0, q * (log_q - log_s), torch.zeros_like(q)).sum(-1)


class DistillLoss:
    """The training stage's KD loss: ``loss(hidden, parts, labels, block_index, chunk) -> (sum, n, terms)``."""

    def __init__(self, cache: TeacherCache, vmap: VocabularyMap, packed, student_lengths: np.ndarray, *,
                 weight: float = 0.5, temperature: float = 1.0, mode: str = "rest", chain_weight: float = 0.0):
        if mode not in KD_MODES:
            raise ValueError(f"--kd-mode must be one of {KD_MODES}, got {mode!r}")
        if mode == "uld" and temperature != 1.0:
            raise ValueError("--kd-mode uld is defined at temperature 1 (Boizard et al. 2024): drop --kd-temperature")
        if vmap.kind == "foreign" and mode != "uld":
            raise ValueError("the teacher's tokenizer is neither the student's nor the base of its extension: "
                             "distil from a teacher of the student's tokenizer family, or pass --kd-mode uld")
        self.cache, self.vmap, self.packed = cache, vmap, packed
        self.weight, self.temperature, self.mode, self.chain_weight = weight, temperature, mode, chain_weight
        ids = packed.input_ids
        first_len = np.where(packed.end_byte[:, 0] == 0, 0, student_lengths[ids[:, 0]])
        self.block_start = _key(packed.doc[:, 0], np.where(first_len == 0, 0, packed.end_byte[:, 0] - first_len + 1))
        self._groups = None
        self._row_targets = None

    @classmethod
    def from_cache(cls, cache_dir, built, docs, packed, cfg) -> "DistillLoss":
        """Open ``cache_dir`` for this run (text hash and tokenizer family checked) and report the masked share."""
        from trkit.packing import token_byte_lengths

        if getattr(cfg, "format", "text") != "text":
            raise ValueError("--distill works on running text (--format text): the teacher cache is built from "
                             "document text, not chat templates")
        if getattr(cfg, "loss", "chunked") != "chunked":
            raise ValueError("--distill needs --loss chunked (the KD loss is computed from hidden states in chunks)")
        cache = TeacherCache(cache_dir)
        p = cache.plan
        if p["text_sha256"] != docs.sha256:
            raise ValueError(f"the teacher cache {cache_dir} was made from other text (stream hash "
                             f"{p['text_sha256'][:12]}…, this run's {docs.sha256[:12]}…): it was built with --corpus "
                             f"{' '.join(p['corpus'])} --seed {p['seed']} --max-documents {p['max_documents']}; train "
                             "with those, or rebuild the cache with this run's --corpus, --seed and --max-documents")
        rows = built.causal.get_output_embeddings().weight.shape[0]
        candidates = [getattr(cfg, "tokenizer", None), str(built.source)]
        vmap = vocabulary_map(built.tokenizer, rows, cache.tokenizer_dir, candidates)
        mode = getattr(cfg, "kd_mode", "rest")
        if vmap.kind == "foreign":
            if mode != "uld":
                raise ValueError(f"the teacher cache's tokenizer ({cache.plan['teacher']['name']}, fingerprint "
                                 f"{p['tokenizer_fingerprint'][:12]}…) is neither the student's tokenizer nor the base "
                                 "of its extension, so token ids cannot be matched: distil from a teacher of the "
                                 "student's family (same tokenizer, or the base the vocabulary was extended from), or "
                                 "pass --kd-mode uld (sorted-probability L1, ignores token identity)")
            warnings.warn("KD with --kd-mode uld: the teacher has another tokenizer; ULD compares sorted probability "
                          "vectors and ignores which token is which (Boizard et al. 2024)", UserWarning, stacklevel=2)
        kd = cls(cache, vmap, packed, token_byte_lengths(built.tokenizer), weight=cfg.kd_weight,
                 temperature=cfg.kd_temperature, mode=mode, chain_weight=getattr(cfg, "kd_chain_weight", 0.0))
        masked = kd.masked_share()
        hint = ""
        if masked > 0.05:
            hint = (f"; many student positions have a teacher that saw less text: build the cache with a longer "
                    f"--seq-len or a smaller --stride (now {p['seq_len']} / {p['stride']})")
        print(f"[trkit distill] {cache_dir}: teacher {p['teacher']['name']}, {vmap.kind} vocabulary, top-{p['top_k']}, "
              f"mode {mode}, T {cfg.kd_temperature:g}, weight {cfg.kd_weight:g}; {masked:.1%} of labelled "
              f"positions masked{hint}", file=sys.stderr)
        return kd

    # ---- alignment (numpy, per micro-batch) ----

    def _align(self, blocks: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Teacher position for student positions (block, t), -1 where masked."""
        keys = _key(self.packed.doc[blocks, t], self.packed.end_byte[blocks, t])
        j = self.cache.find(keys)
        ok = (j >= 0) & (self.packed.doc[blocks, t] >= 0)
        jj = np.where(ok, j, 0)
        ok &= self.cache.history_start(jj) <= self.block_start[blocks]
        return np.where(ok, j, -1)

    def masked_share(self, max_blocks: int = 4096) -> float:
        """Share of the packed corpus's labelled positions without a teacher (over at most ``max_blocks``
        evenly spaced blocks)."""
        n_blocks, T = self.packed.input_ids.shape
        chosen = np.unique(np.linspace(0, n_blocks - 1, min(n_blocks, max_blocks)).round().astype(np.int64))
        blocks = np.repeat(chosen, T - 1)
        t = np.tile(np.arange(T - 1), len(chosen))
        lab = self.packed.labels[blocks, t + 1] != -100
        j = self._align(blocks[lab], t[lab])
        return float((j < 0).mean()) if j.size else 0.0

    def _teacher(self, rows: np.ndarray, targets: np.ndarray, T: int, block_index: np.ndarray, device):
        import torch

        blocks = block_index[rows // T]
        t = rows % T
        j = self._align(blocks, t)
        valid = j >= 0
        n, k = len(rows), self.cache.layout.k
        ids = np.zeros((n, k), np.int64)
        lps = np.zeros((n, k), np.float32)
        rest = np.zeros(n, np.float32)
        chain = np.zeros(n, bool)
        chain_lp = np.zeros(n, np.float32)
        if valid.any():
            ids[valid], lps[valid], _, rest[valid] = self.cache.records(j[valid])
            if self.chain_weight > 0 and self.vmap.kind == "extended":
                chain, chain_lp = self._chain(j, valid, blocks, t, targets)
        as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return as_t(valid), as_t(ids), as_t(lps), as_t(rest), as_t(chain), as_t(chain_lp)

    def _chain(self, j, valid, blocks, t, targets):
        """Positions whose realised next token is new, with the teacher's summed realised log-probabilities."""
        vm = self.vmap
        new = valid & (targets >= vm.new_lo) & (targets < vm.new_hi)
        m = np.where(new, vm.lengths[np.clip(targets - vm.new_lo, 0, len(vm.lengths) - 1)], 0)
        n_t = len(self.cache)
        ok = new & (j + m < n_t)
        total = np.zeros(len(j), np.float64)
        for r in range(int(m.max()) if m.size else 0):
            sel = ok & (r < m)
            if not sel.any():
                continue
            jr = j[sel] + r
            ok[sel] &= self.cache.history_start(jr) <= self.block_start[blocks[sel]]
            total[sel] += self.cache.records(jr)[2]
        # the teacher token that ends where the student's new token ends closes the span
        end_key = _key(self.packed.doc[blocks, np.minimum(t + 1, self.packed.seq_len - 1)],
                       self.packed.end_byte[blocks, np.minimum(t + 1, self.packed.seq_len - 1)])
        jm = np.clip(j + m, 0, n_t - 1)
        ok &= self.cache.keys[jm] == end_key
        ok &= np.isfinite(total)
        return ok, np.where(ok, total, 0.0).astype(np.float32)

    # ---- the per-position terms (torch, per chunk of fp32 logits) ----

    def terms(self, z: "torch.Tensor", targets: "torch.Tensor", ids, lps, rest, chain, chain_lp) -> dict:
        """Per-position CE, KD divergence and chain term of student logits ``z`` (n x rows) whose teacher
        records are given (all positions valid)."""
        import torch

        T = self.temperature
        lp = torch.log_softmax(z, dim=-1)
        out = {"ce": -lp.gather(1, targets[:, None]).squeeze(1)}
        if self.vmap.kind == "extended" and self._groups is None:
            self._groups = new_token_groups(self.vmap, z.device)
        if self.mode == "rest":
            if self._row_targets is None or self._row_targets.numel() != z.shape[1]:
                self._row_targets = torch.from_numpy(row_targets(self.vmap, z.shape[1])).to(z.device)
            s_k = mapped_log_probs(lp, self.vmap, ids, self._groups)
            s_rest = outside_log_mass(lp, ids, self._row_targets)
            s = torch.log_softmax(torch.cat([s_k, s_rest[:, None]], 1) / T, dim=1)
            q_log = torch.log_softmax(torch.cat([lps, rest[:, None]], 1) / T, dim=1)
            out["kd"] = _xlogy_ratio(q_log.exp(), q_log, s)
        elif self.mode == "renormalized":
            lp_t = lp if T == 1.0 else torch.log_softmax(z / T, dim=-1)
            s_k = mapped_log_probs(lp_t, self.vmap, ids, self._groups)
            q_log = torch.log_softmax(lps / T, dim=1)
            out["kd"] = _xlogy_ratio(q_log.exp(), q_log, s_k)
        else:  # ULD: sorted probabilities, L1
            top = lp.topk(ids.shape[1], dim=1).values.exp()
            out["kd"] = (top - lps.exp()).abs().sum(1) + ((1 - top.sum(1)).clamp_min(0) - rest.exp()).abs()
        if chain is not None and bool(chain.any()):
            a = chain_lp.exp().clamp(0, 1)
            lb = lp.gather(1, targets[:, None]).squeeze(1)
            b = lb.exp().clamp(max=1 - 1e-7)
            bern = (torch.xlogy(a, a) - a * lb + torch.xlogy(1 - a, 1 - a) - (1 - a) * torch.log1p(-b))
            out["chain"] = torch.where(chain, bern, torch.zeros_like(bern))
        return out

    def loss(self, hidden: "torch.Tensor", parts, labels: "torch.Tensor", block_index: "torch.Tensor",
             chunk: int) -> tuple["torch.Tensor", int, dict]:
        """Summed per-position loss of a micro-batch (see the module doc), its labelled count and log terms."""
        import torch

        from trkit.losses import chunked_head_loss, shifted_targets

        rows, targets = shifted_targets(labels)
        T_len = labels.shape[1]
        valid, ids, lps, rest, chain, chain_lp = self._teacher(rows.cpu().numpy(), targets.cpu().numpy(), T_len,
                                                               block_index.cpu().numpy(), hidden.device)
        w, T2, lam = self.weight, self.temperature ** 2, self.chain_weight
        sums = {"kd/ce": 0.0, "kd/kl": 0.0, "kd/masked": 0.0}
        if lam > 0:
            sums.update({"kd/chain": 0.0, "kd/chain_positions": 0.0})

        def chunk_fn(z: torch.Tensor, sl: slice) -> torch.Tensor:
            v = valid[sl]
            tg = targets[sl]
            ce_all = torch.nn.functional.cross_entropy(z, tg, reduction="none")
            total = ce_all[~v].sum()
            sums["kd/ce"] += float(ce_all.detach().sum())
            sums["kd/masked"] += float((~v).sum())
            if bool(v.any()):
                vi = v.nonzero().squeeze(1)
                has_chain = lam > 0 and self.vmap.kind == "extended"
                t = self.terms(z.index_select(0, vi), tg[vi], ids[sl][vi], lps[sl][vi], rest[sl][vi],
                               chain[sl][vi] if has_chain else None, chain_lp[sl][vi] if has_chain else None)
                per = (1 - w) * ce_all[vi] + w * T2 * t["kd"]
                sums["kd/kl"] += float(t["kd"].detach().sum())
                if "chain" in t:
                    per = per + w * lam * t["chain"]
                    sums["kd/chain"] += float(t["chain"].detach().sum())
                    sums["kd/chain_positions"] += float(chain[sl][vi].sum())
                total = total + per.sum()
            return total

        total = chunked_head_loss(hidden, parts, rows, chunk_fn, chunk)
        return total, int(targets.numel()), sums

    def per_position(self, hidden: "torch.Tensor", parts, labels: "torch.Tensor", block_index: "torch.Tensor",
                     chunk: int = 1024) -> dict[str, np.ndarray]:
        """The per-position values behind :meth:`loss`, without gradients (tests, benchmarks, notebooks):
        ``rows`` (flattened positions), ``valid``, ``ce``, ``kd`` (NaN where masked) and, with a chain
        weight, ``chain``."""
        import torch

        from trkit import losses

        rows, targets = losses.shifted_targets(labels)
        valid, ids, lps, rest, chain, chain_lp = self._teacher(rows.cpu().numpy(), targets.cpu().numpy(),
                                                               labels.shape[1], block_index.cpu().numpy(), hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = {"rows": rows.cpu().numpy(), "valid": valid.cpu().numpy(), "ce": [], "kd": [], "chain": []}
        with torch.no_grad():
            for lo in range(0, rows.numel(), chunk):
                sl = slice(lo, lo + chunk)
                z = losses.chunk_logits(flat.index_select(0, rows[sl]), parts, parts.delta)
                has_chain = self.chain_weight > 0 and self.vmap.kind == "extended"
                t = self.terms(z, targets[sl], ids[sl], lps[sl], rest[sl], chain[sl] if has_chain else None,
                               chain_lp[sl] if has_chain else None)
                kd = torch.where(valid[sl], t["kd"], torch.full_like(t["kd"], math.nan))
                out["ce"].append(t["ce"].cpu().numpy())
                out["kd"].append(kd.cpu().numpy())
                out["chain"].append(t["chain"].cpu().numpy() if "chain" in t else np.zeros(len(kd), np.float32))
        for k in ("ce", "kd", "chain"):
            out[k] = np.concatenate(out[k]) if out[k] else np.zeros(0, np.float32)
        return out


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit distill cache --teacher NAME_OR_DIR --corpus default --top-k 32 --seq-len L --out DIR
#      python -m trkit distill info DIR
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trkit import options as o

    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    c = sub.add_parser("cache", help="run the teacher once and write its top-k log-probabilities (resumable)",
                       description="Run the teacher over the training text (its own tokenizer, the training stage's "
                                   "document order) and write a compact, resumable top-k cache.")
    c.add_argument("--teacher", required=True, help="teacher checkpoint: a directory, hub name or alias (smollm2, qwen3-tiny)")
    c.add_argument("--corpus", nargs="+", default=["default"],
                   help="the training stage's --corpus: default | trkit corpus dir | text/JSONL/parquet files | hub dataset")
    c.add_argument("--out", required=True, help="cache directory (on Colab: on Drive; rerun the command to resume)")
    c.add_argument("--top-k", type=o.positive_int, default=32, help="teacher token ids and log-probs kept per position")
    c.add_argument("--seq-len", type=o.positive_int, help="teacher window in tokens (default: the profile's)")
    c.add_argument("--stride", type=o.positive_int,
                   help="tokens predicted per window (divides --seq-len; default --seq-len: plain blocks; smaller: every "
                        "position sees at least seq-len - stride tokens of history, at seq-len/stride x the compute)")
    c.add_argument("--seed", type=o.nonnegative_int, default=0, help="the training stage's --seed (document order)")
    c.add_argument("--max-documents", type=o.positive_int, help="the training stage's --max-documents")
    c.add_argument("--text-field", default="text", help="text column of JSONL/parquet input")
    c.add_argument("--profile", default="auto", help="auto | cpu | t4 | a100 | gpu (T4: NF4 teacher; A100: bf16)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="teacher compute dtype (default: the profile's)")
    c.add_argument("--batch-size", type=o.positive_int, help="windows per forward pass (default: the profile's)")
    c.add_argument("--shard-positions", type=o.positive_int, default=DEFAULT_SHARD_POSITIONS,
                   help="positions per shard (the unit of resumption)")
    c.add_argument("--plan-only", action="store_true", help="print the plan (positions, Drive space, shards) and exit")
    c.add_argument("--overwrite", action="store_true", help="discard a cache with other settings in --out and start again")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a teacher cache (teacher, positions, bytes per position, text hash)")
    i.add_argument("directory", help="a `trkit distill cache` output")
    i.add_argument("--no-verify", action="store_true", help="skip the shards' sha256 check")


def run_cli(args: argparse.Namespace) -> int:
    if args.action == "info":
        print(json.dumps(TeacherCache(args.directory, verify=not args.no_verify).summary(), indent=2))
        return 0
    r = cache_teacher_logits(args.teacher, args.corpus, args.out, top_k=args.top_k, seq_len=args.seq_len,
                             stride=args.stride, seed=args.seed, max_documents=args.max_documents,
                             text_field=args.text_field, profile=args.profile, dtype=args.dtype,
                             batch_size=args.batch_size, shard_positions=args.shard_positions,
                             overwrite=args.overwrite, progress=not args.quiet, plan_only=args.plan_only)
    result = {"out": str(r.out), "positions": r.positions, "computed_positions": r.computed_positions,
              "shards_computed": r.shards_computed, "shards_skipped": r.shards_skipped, "seconds": r.seconds,
              "positions_per_s": r.positions_per_s, "bytes": r.bytes, "bytes_per_position": r.bytes_per_position,
              "plan_only": args.plan_only}
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.plan_only:
        print(describe_plan(r.plan))
    else:
        print(f"wrote {r.out}: {r.positions:,} positions, {r.bytes_per_position:.1f} B/position "
              f"({r.bytes / 2**20:.1f} MiB); computed {r.shards_computed} shard(s), skipped {r.shards_skipped}"
              + (f", {r.positions_per_s:,.0f} positions/s" if r.computed_positions else ""))
    return 0
