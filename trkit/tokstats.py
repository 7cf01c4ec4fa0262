"""Tokenizer report: how many tokens a tokenizer spends on each text source, against its base.

Per source (a file, one document per line, or a list of texts) and pooled:

* ``tokens``, ``words`` (``trkit.turkish.split_words``), ``chars``;
* fertility = tokens / words (Rust et al. 2021, "How Good is Your Tokenizer?") and chars / token;
* ``pct_fewer`` = 100 * (1 - tokens / base_tokens);
* new-token use: distinct ids >= ``len(base)`` that occur, their share of all new tokens, and how
  many are never used (an extension that learned its corpus's topics wastes rows here);
* ``roundtrip_failures``: documents where ``decode(encode(doc))`` differs from the document after the
  tokenizer's own normaliser (NFC for Qwen) -- the failure mode of ``add_tokens`` on Turkish;
* ``coarsening_violations``: documents where some token boundary of the tokenizer is not a token
  boundary of the base (continued BPE with appended merges must only glue base tokens together);
* ``morph_boundary_share``: of the word-internal token boundaries inside alphabetic words, the share
  that fall on a stem|suffix or suffix|suffix boundary proposed by ``trkit.turkish.suffix_boundaries``.

Encoding uses the ``tokenizers`` backends directly (the same objects ``AutoTokenizer`` wraps), without
special tokens, so the numbers are about the text itself.
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping


def load_backend(tokenizer: Any):
    """A ``tokenizers.Tokenizer`` from a name ('qwen3', 'smollm2'), a directory, a tokenizer.json, or an object."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.backend_tokenizer
    p = Path(tokenizer)
    if not p.exists():
        from trkit.assets import resolve_tokenizer

        p = Path(resolve_tokenizer(str(tokenizer)))
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}: pass a tokenizer directory, 'qwen3' or 'smollm2'")
    return Tokenizer.from_file(str(p))


def read_documents(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Documents of a text file (one per line, blank lines skipped) or an iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return [d for d in source if d and d.strip()]


def _boundaries(tokens: list[str]) -> set[int]:
    out, pos = set(), 0
    for t in tokens[:-1]:
        pos += len(t)
        out.add(pos)
    return out


_ALPHA_WORD = re.compile(r"[^\W\d_]+")


def _morph_boundary_counts(doc: str, offsets: list[tuple[int, int]], lexicon) -> tuple[int, int]:
    """(word-internal token boundaries, those on a morph boundary) over the alphabetic words of ``doc``."""
    from trkit.turkish import suffix_boundaries

    starts = sorted({a for a, _ in offsets})
    internal = on_morph = 0
    for m in _ALPHA_WORD.finditer(doc):
        s, e = m.span()
        lo, hi = bisect.bisect_right(starts, s), bisect.bisect_left(starts, e)
        cuts = [c - s for c in starts[lo:hi]]
        if not cuts:
            continue
        morph = set(suffix_boundaries(m.group(), lexicon))
        internal += len(cuts)
        on_morph += sum(c in morph for c in cuts)
    return internal, on_morph


def compare(
    base: Any,
    tokenizer: Any,
    texts: Mapping[str, Any],
    *,
    morphology: bool = False,
    lexicon: Mapping[str, int] | None = None,
) -> dict:
    """Report of ``tokenizer`` against ``base`` on every source in ``texts`` ({name: file or texts}).

    Returns ``{"base_vocab_size", "vocab_size", "n_new_tokens", "sources": {name: stats}, "all": stats}``.
    With ``morphology`` also the share of word-internal boundaries on suffix boundaries (slower); the
    segmenter's lexicon of plausible stems is ``lexicon`` or else the words of ``texts`` themselves.
    """
    from trkit.turkish import split_words

    b, t = load_backend(base), load_backend(tokenizer)
    n_base = b.get_vocab_size(with_added_tokens=True)
    n_total = t.get_vocab_size(with_added_tokens=True)
    n_new = max(0, n_total - n_base)
    normalizer = t.normalizer
    report: dict = {"base_vocab_size": n_base, "vocab_size": n_total, "n_new_tokens": n_new, "sources": {}}
    used_all: set[int] = set()
    totals: dict[str, float] = {}
    documents = {name: read_documents(src) for name, src in texts.items()}
    if morphology and lexicon is None:  # plausible stems: the words of the evaluated texts themselves
        from trkit.turkish import build_lexicon

        lexicon = build_lexicon(collections.Counter(w for docs in documents.values() for d in docs
                                                    for w in split_words(d)).items())
    for name, docs in documents.items():
        eb = b.encode_batch(docs, add_special_tokens=False)
        et = t.encode_batch(docs, add_special_tokens=False)
        tok_b = sum(len(e.ids) for e in eb)
        tok_t = sum(len(e.ids) for e in et)
        words = sum(len(split_words(d)) for d in docs)
        chars = sum(len(d) for d in docs)
        used = {i for e in et for i in e.ids if i >= n_base}
        used_all |= used
        decoded = t.decode_batch([e.ids for e in et], skip_special_tokens=False)
        rt = sum(dec != (normalizer.normalize_str(d) if normalizer else d) for d, dec in zip(docs, decoded))
        coarse = sum(not _boundaries(x.tokens) <= _boundaries(y.tokens) for x, y in zip(et, eb))
        stats = {
            "documents": len(docs),
            "chars": chars,
            "words": words,
            "base_tokens": tok_b,
            "tokens": tok_t,
            "base_fertility": tok_b / words if words else None,
            "fertility": tok_t / words if words else None,
            "chars_per_token": chars / tok_t if tok_t else None,
            "pct_fewer": 100.0 * (1 - tok_t / tok_b) if tok_b else 0.0,
            "new_tokens_used": len(used),
            "new_tokens_used_share": len(used) / n_new if n_new else None,
            "new_tokens_never_used": n_new - len(used),
            "roundtrip_failures": rt,
            "coarsening_violations": coarse,
        }
        if morphology:
            internal = on = 0
            for d, e in zip(docs, et):
                i, o = _morph_boundary_counts(d, e.offsets, lexicon)
                internal, on = internal + i, on + o
            stats["word_internal_boundaries"] = internal
            stats["morph_boundary_share"] = on / internal if internal else None
        report["sources"][name] = stats
        for k in ("documents", "chars", "words", "base_tokens", "tokens", "roundtrip_failures", "coarsening_violations",
                  "word_internal_boundaries"):
            if k in stats:
                totals[k] = totals.get(k, 0) + stats[k]
    if totals:
        all_stats: dict[str, Any] = {k: int(v) for k, v in totals.items()}
        all_stats.update(
            base_fertility=totals["base_tokens"] / totals["words"] if totals["words"] else None,
            fertility=totals["tokens"] / totals["words"] if totals["words"] else None,
            chars_per_token=totals["chars"] / totals["tokens"] if totals["tokens"] else None,
            pct_fewer=100.0 * (1 - totals["tokens"] / totals["base_tokens"]) if totals["base_tokens"] else 0.0,
            new_tokens_used=len(used_all),
            new_tokens_used_share=len(used_all) / n_new if n_new else None,
            new_tokens_never_used=n_new - len(used_all),
        )
        report["all"] = all_stats
    return report


def word_token_counts(tokenizer: Any, docs: Iterable[str]) -> list[int]:
    """Tokens spent on each word (a token counts for every word its span overlaps), for histograms."""
    from trkit.turkish import split_words  # noqa: F401  (same notion of word as the report)

    t = load_backend(tokenizer)
    docs = list(docs)
    out: list[int] = []
    word_re = re.compile(r"[^\W_]+(?:['’][^\W\d_]+)*")
    for d, e in zip(docs, t.encode_batch(docs, add_special_tokens=False)):
        offs = e.offsets
        j = 0
        for m in word_re.finditer(d):
            s, end = m.span()
            while j < len(offs) and offs[j][1] <= s:
                j += 1
            k, n = j, 0
            while k < len(offs) and offs[k][0] < end:
                n += 1
                k += 1
            out.append(n)
    return out


def format_table(report: dict) -> str:
    """A plain-text table of a ``compare`` report."""
    cols = ["documents", "words", "base_tokens", "tokens", "base_fertility", "fertility", "chars_per_token",
            "pct_fewer", "new_tokens_used", "new_tokens_never_used", "roundtrip_failures", "coarsening_violations"]
    rows = list(report["sources"].items()) + ([("ALL", report["all"])] if "all" in report else [])
    head = ["source"] + cols
    lines = ["  ".join(head)]
    for name, st in rows:
        cells = [name]
        for c in cols:
            v = st.get(c)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--base", default="qwen3", help="base tokenizer: qwen3 | smollm2 | directory")
    parser.add_argument("--tokenizer", required=True, help="extended tokenizer directory (from `trkit vocab`)")
    parser.add_argument("--text", nargs="+", default=["validation"],
                        help="text files (one document per line); 'validation' = the offline Turkish validation "
                             "split per source plus the English file")
    parser.add_argument("--morphology", action="store_true", help="also the share of boundaries on suffix boundaries")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_cli(args) -> int:
    texts: dict[str, Any] = {}
    for item in args.text:
        if item == "validation":
            from trkit import assets

            texts.update({f"tr-{k}": v for k, v in assets.validation_files().items()})
            texts["english"] = assets.english_file()
        else:
            p = Path(item)
            if not p.is_file():
                raise FileNotFoundError(f"--text {item}: no such file; pass text files or 'validation'")
            texts[p.stem if p.stem not in texts else str(p)] = p
    report = compare(args.base, args.tokenizer, texts, morphology=args.morphology)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_table(report))
    return 0
