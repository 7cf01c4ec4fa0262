"""Honest evaluation of language models across vocabularies: bits per character and per byte.

Per-token perplexity cannot compare two tokenizers: a model whose tokenizer spends half as many
tokens on Turkish has a larger per-token loss even when it predicts the text better. Normalising
the *total* negative log-likelihood of a text by the text's length makes the numbers comparable
(Graves 2013, "Generating sequences with recurrent neural networks", bits per character; Gao et
al. 2020, "The Pile", bits per UTF-8 byte):

    BPC = - sum_t log p(x_t | x_<t) / (n_chars * ln 2)        BPB = same / n_bytes

Each document is scored on its own, its first token conditioned on a document-separator token
(``<|endoftext|>`` where the vocabulary has one, else BOS, else EOS; the same id for a base model
and its vocabulary extension, so both pay for every character). A document longer than the
window is scored with a sliding window (Press et al. 2021; the Hugging Face "perplexity of
fixed-length models" recipe): windows of ``max_length`` tokens advance by ``stride`` tokens and
only the targets not scored by an earlier window are counted, so every token is scored exactly
once with at least ``max_length - stride`` tokens of context.

Windows from all documents are sorted by length and batched with left padding. Logits are built
only for the scored positions and only a fixed number of them at a time (``LOGIT_CHUNK_ELEMENTS``
float32 values, 128 MiB: 220 positions of Qwen3's 151,936-row head), whatever the batch size,
``max_length`` or stride. (Keeping only each window's scored tail is not enough: a document's first
window scores all of its up to ``max_length`` tokens, and a batch of line documents is almost all
first windows.) A forward pre-hook on the model's output embedding takes the final hidden states
and hands the head one position per row; the head module itself is then called on chunks of the
scored positions, so PEFT wrappers on the head (LoRA, ``trainable_token_indices``), tied heads and
4-bit bodies score as in the model's own forward, and the log-softmax is taken in float32. A model
that changes its logits after the head (e.g. Gemma 2's soft-capping) is detected on each window's
last position, which the model's own forward still scores, and refused.

Later stages add their measurements here (forgetting on English, benchmarks); every one of them
reports characters, bytes and tokens beside the score.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Text in
# --------------------------------------------------------------------------------------------


def read_documents(path: str | Path, unit: str = "line", notes: list[str] | None = None) -> list[str]:
    """Read a UTF-8 text file as documents: one per non-empty line (``unit="line"``, the format
    of trkit's corpus and validation files) or the whole file as one document (``"file"``).

    Lines end at ``\n`` only (``trkit corpus`` and ``trkit vocab`` split the same way; Python's
    ``splitlines`` would also split at \x0b \x0c \x1c \x85 \u2028), a leading byte-order mark is
    removed, gzip/bzip2/xz files are decompressed, invalid UTF-8 is an error naming the file and line,
    and a document over ``trkit.corpus.MAX_DOCUMENT_CHARS`` characters is scored as consecutive
    pieces (bounded memory; a line saying so goes to ``notes``). See ``trkit.corpus.read_documents``.

    Only the documents' own characters are counted by the scores (not the newlines between
    line documents)."""
    from trkit.corpus import read_documents as read

    return read(path, unit=unit, notes=notes)


def document_prefix_id(tokenizer) -> int:
    """The token every document is conditioned on: the pretraining document separator
    ``<|endoftext|>`` if the vocabulary has one (GPT-2 style BPE: SmolLM2, Qwen), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError(
        "the tokenizer has no <|endoftext|>, BOS or EOS token to start documents with; "
        "set tokenizer.bos_token before scoring"
    )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class TextScore:
    """Totals for one set of documents; the rates are derived from them."""

    documents: int
    chars: int
    bytes: int
    tokens: int
    nll_nats: float

    @property
    def bits_per_char(self) -> float:
        return self.nll_nats / (self.chars * LN2) if self.chars else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / (self.bytes * LN2) if self.bytes else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.nll_nats / (self.tokens * LN2) if self.tokens else float("nan")

    def __add__(self, other: "TextScore") -> "TextScore":
        return TextScore(
            self.documents + other.documents,
            self.chars + other.chars,
            self.bytes + other.bytes,
            self.tokens + other.tokens,
            self.nll_nats + other.nll_nats,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chars_per_token"] = self.chars / self.tokens if self.tokens else float("nan")
        d["bits_per_char"] = self.bits_per_char
        d["bits_per_byte"] = self.bits_per_byte
        return d


def sliding_windows(n_targets: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence ``s`` of ``n_targets + 1`` ids (prefix + tokens).

    Returns ``(start, end, n_scored)``: the window feeds ``s[start:end]`` and predicts
    ``s[start+1:end+1]``; its last ``n_scored`` predictions are new. Every target index
    1..n_targets is scored exactly once, with at least ``max_length - stride`` tokens of context
    once the first window is full.
    """
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    out = []
    prev_end = 0
    end = min(max_length, n_targets)
    while True:
        out.append((max(0, end - max_length), end, end - prev_end))
        if end >= n_targets:
            return out
        prev_end, end = end, min(end + stride, n_targets)


LOGIT_CHUNK_ELEMENTS = 1 << 25  # logits materialised at a time: 128 MiB of float32


def _nll_of_batch(model, windows: list[list[int]], n_scored: list[int], device) -> list[float]:
    """Summed negative log-likelihood (nats) of the scored tail of each window (left-padded batch).

    The model's forward runs with the head fed one position per row (a pre-hook keeps the full
    hidden states); the head is then applied to the scored positions, a chunk at a time.
    """
    import torch

    width = max(len(w) for w in windows) - 1  # inputs are w[:-1], targets w[1:]
    keep = max(n_scored)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.long)
    targets = torch.full((len(windows), keep), -100, dtype=torch.long)
    for row, (w, m) in enumerate(zip(windows, n_scored)):
        n = len(w) - 1
        ids[row, width - n :] = torch.tensor(w[:-1])
        mask[row, width - n :] = 1
        targets[row, keep - m :] = torch.tensor(w[len(w) - m :])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embedding (get_output_embeddings() is None): score a causal LM")
    captured = []

    def one_position_per_row(module, args):
        if not args:
            raise RuntimeError("the model calls its output embedding without a positional input; trkit cannot score it")
        captured.append(args[0])
        # contiguous: a strided (batch, 1, hidden) view makes torch's matmul fall back to bmm against the head
        # weight expanded per row (a full copy of a 69k x 576 matrix per window) whenever no tensor needs grad
        return (args[0][..., -1:, :].contiguous(), *args[1:])

    handle = head.register_forward_pre_hook(one_position_per_row)
    try:
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
            use_cache=False,
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the model called its output embedding {len(captured)} times in one forward; expected once")
    hidden = captured[0]  # (batch, keep, hidden): the head's input at the kept positions
    if hidden.dim() != 3 or hidden.shape[1] != keep:
        raise RuntimeError(f"{type(model).__name__} ignored logits_to_keep={keep} (head input {tuple(hidden.shape)}); trkit cannot score it")
    model_last = out.logits[:, -1]  # (batch, vocab): the model's own logits at each window's last position
    targets = targets.to(hidden.device)
    rows, cols = (targets >= 0).nonzero(as_tuple=True)
    nll = torch.zeros(len(windows), dtype=torch.float64, device=hidden.device)
    per_chunk = max(1, LOGIT_CHUNK_ELEMENTS // model_last.shape[-1])
    for lo in range(0, rows.numel(), per_chunk):
        r, c = rows[lo : lo + per_chunk], cols[lo : lo + per_chunk]
        logits = head(hidden[r, c])
        last = c == keep - 1  # every window scores its last position
        if last.any() and not torch.allclose(logits[last].float(), model_last[r[last]].float(), rtol=1e-2, atol=1e-2):
            raise ValueError(
                f"{type(model).__name__} changes its logits after the output embedding (e.g. soft-capping or "
                "scaling), so trkit's chunked scoring would not reproduce them; this model is not supported"
            )
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[r, c], reduction="none")
        nll.index_add_(0, r, loss.double())
    if not torch.isfinite(nll).all():
        raise RuntimeError("the model produced non-finite log-likelihoods (NaN/Inf weights or logits)")
    return nll.tolist()


def score_documents(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "bpc",
) -> TextScore:
    """Total NLL of ``documents`` under ``model`` (each document scored on its own, see module doc).

    ``max_length`` defaults to min(1024, the model's context); ``stride`` to half of it.
    """
    import torch
    from trkit.progress import tqdm

    if not documents:
        raise ValueError("no documents to score")
    if max_length is None:
        max_length = min(1024, int(getattr(model.config, "max_position_embeddings", 1024) or 1024))
    stride = max_length // 2 if stride is None else stride
    prefix = document_prefix_id(tokenizer)
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    items = []  # (window ids, n_scored)
    for ids in encoded:
        if ids and max(ids) >= n_vocab:
            raise ValueError(
                f"the tokenizer produces id {max(ids)} but the model has only {n_vocab} embedding rows: "
                "use the model that belongs to this tokenizer (run `trkit embed` first for an extended tokenizer)"
            )
        seq = [prefix] + list(ids)
        for start, end, n_scored in sliding_windows(len(ids), max_length, stride):
            if n_scored:
                items.append((seq[start : end + 1], n_scored))
    items.sort(key=lambda it: len(it[0]), reverse=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode(), tqdm(total=len(items), desc=desc, unit="win", disable=not progress) as bar:
            for lo in range(0, len(items), batch_size):
                batch = items[lo : lo + batch_size]
                total += sum(_nll_of_batch(model, [w for w, _ in batch], [m for _, m in batch], device))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return TextScore(
        documents=len(documents),
        chars=sum(len(d) for d in documents),
        bytes=sum(len(d.encode("utf-8")) for d in documents),
        tokens=sum(len(ids) for ids in encoded),
        nll_nats=total,
    )


def bits_per_char(model, tokenizer, documents: Sequence[str] | str, **kwargs) -> float:
    """Bits per character of ``documents`` (a string is one document). See ``score_documents``."""
    docs = [documents] if isinstance(documents, str) else documents
    return score_documents(model, tokenizer, docs, **kwargs).bits_per_char


def bits_per_byte(model, tokenizer, documents: Sequence[str] | str, **kwargs) -> float:
    """Bits per UTF-8 byte of ``documents`` (a string is one document). See ``score_documents``."""
    docs = [documents] if isinstance(documents, str) else documents
    return score_documents(model, tokenizer, docs, **kwargs).bits_per_byte


def evaluate_files(
    model, tokenizer, paths: Iterable[str | Path], *, unit: str = "line", progress: bool = True, **kwargs
) -> dict:
    """Score each file and all of them pooled: ``{"files": {path: {...}}, "pooled": {...}}``."""
    per_file: dict[str, dict] = {}
    pooled: TextScore | None = None
    for path in paths:
        docs = read_documents(path, unit=unit)
        score = score_documents(model, tokenizer, docs, progress=progress, desc=Path(path).name, **kwargs)
        per_file[str(path)] = score.to_dict()
        pooled = score if pooled is None else pooled + score
    if pooled is None:
        raise ValueError("no files given: pass at least one --text FILE")
    return {"files": per_file, "pooled": pooled.to_dict()}


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit bpc --model DIR --text FILE... --json
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trkit.corpus import TEXT_HELP
    from trkit.options import positive_int

    parser.add_argument("--model", required=True, help="model dir, hub name, or offline alias (smollm2, qwen3-tiny)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the model's own)")
    parser.add_argument("--text", nargs="+", default=["validation"], metavar="TEXT", help=TEXT_HELP)
    parser.add_argument("--split", default="validation", choices=("validation", "test", "train"),
                        help="the split of a `trkit corpus` directory given to --text (default validation)")
    parser.add_argument("--unit", choices=["line", "file"], default="line",
                        help="a document is one line (default; trkit corpus format) or the whole file")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="window length in tokens (default min(1024, context))")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="window stride in tokens, at most --max-length (default max_length/2)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    parser.add_argument("--profile", default="auto", help="hardware profile: auto | cpu | t4 | a100 | gpu (device, "
                                                          "dtype, 4-bit loading)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype (auto: the profile's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr, also with --json)")


def _check_tokenizer_belongs(model_dir: Path, tokenizer: str | None) -> None:
    """A --tokenizer other than the checkpoint's own must have the same vocabulary (an extension's new
    ids would otherwise land on untrained padding rows and score garbage without an error)."""
    if not tokenizer or not (model_dir / "tokenizer.json").is_file():
        return
    from trkit.tokstats import load_backend, tokenizer_json_path
    from trkit.vocab import tokenizer_fingerprint

    theirs = tokenizer_json_path(tokenizer, "--tokenizer")
    load_backend(theirs)  # a broken tokenizer.json is an error naming it
    if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(model_dir / "tokenizer.json"):
        raise ValueError(f"--tokenizer {tokenizer} is not the tokenizer of --model {model_dir} (different vocabulary "
                         f"than its tokenizer.json): score a model with its own tokenizer (drop --tokenizer), or give "
                         "an extended tokenizer its rows first with `trkit embed`")


def run_cli(args: argparse.Namespace) -> int:
    from trkit.checkpoints import resolve_checkpoint, verify_checkpoint
    from trkit.corpus import describe_sources, text_sources
    from trkit.loading import load_model
    from trkit.profiles import get_profile

    # Everything that can be wrong is checked before the model is loaded.
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise ValueError(f"--stride {args.stride} exceeds --max-length {args.max_length}: windows would skip tokens")
    sources = text_sources(args.text, split=args.split)
    notes: list[str] = []
    documents = {s.name: s.read(unit=args.unit, notes=notes) for s in sources}
    profile = get_profile(args.profile)
    model_dir = resolve_checkpoint(args.model)
    verify_checkpoint(model_dir)
    _check_tokenizer_belongs(model_dir, args.tokenizer)
    progress = not args.quiet
    print("texts (name, language, from):\n" + describe_sources(sources), file=sys.stderr)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)

    model, tokenizer = load_model(model_dir, profile, tokenizer=args.tokenizer,
                                  dtype=None if args.dtype == "auto" else args.dtype)
    per_source: dict[str, dict] = {}
    scores: dict[str, TextScore] = {}
    for src in sources:
        score = score_documents(model, tokenizer, documents[src.name], max_length=args.max_length, stride=args.stride,
                                batch_size=args.batch_size, progress=progress, desc=src.name)
        scores[src.name] = score
        per_source[src.given or src.name] = {**score.to_dict(), "language": src.language}
    totals: dict[str, dict] = {}
    for language in dict.fromkeys(s.language for s in sources):
        group = [scores[s.name] for s in sources if s.language == language]
        totals[language] = {"sources": len(group), **sum(group[1:], group[0]).to_dict()}
    pooled = sum(list(scores.values())[1:], list(scores.values())[0])
    loaded = {"profile": profile.name, "device": profile.device,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "load_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False))}
    report = {"model": str(args.model), "tokenizer": str(args.tokenizer or args.model), "loaded": loaded, "files": per_source,
              "totals": totals, "pooled": pooled.to_dict(), "texts": {s.name: s.origin for s in sources},
              "notes": notes}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"{args.model} on profile {loaded['profile']} ({loaded['device']}, {loaded['dtype']}"
          f"{', NF4 4-bit' if loaded['load_in_4bit'] else ''})")
    width = max(12, *(len(Path(n).name) for n in per_source), *(len(f"{g} (all)") for g in totals))
    print(f"{'text':<{width}} {'language':<8} {'chars':>10} {'tokens':>9} {'chars/tok':>9} {'BPC':>7} {'BPB':>7}")
    rows = [(Path(n).name, r) for n, r in per_source.items()] + [(f"{g} (all)", {**r, "language": g})
                                                                 for g, r in totals.items()]
    for name, r in rows:
        print(f"{name:<{width}} {r['language']:<8} {r['chars']:>10d} {r['tokens']:>9d} {r['chars_per_token']:>9.3f} "
              f"{r['bits_per_char']:>7.4f} {r['bits_per_byte']:>7.4f}")
    return 0
