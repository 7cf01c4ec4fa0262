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

Totals are pooled per language (``Turkish``, ``English``, ``other``; from the source names of
``trkit.corpus.text_sources`` or ``trkit.corpus.text_language``), never Turkish with English: an
extension's point is fewer Turkish tokens at an unchanged English count, and a pooled figure hides both.

Encoding uses the ``tokenizers`` backends directly (the same objects ``AutoTokenizer`` wraps), without
special tokens, so the numbers are about the text itself. The CLI first checks that ``--tokenizer`` is
a ``trkit vocab`` output whose files match its manifest and whose base is ``--base`` (the fingerprint
and id checks ``trkit embed`` uses), so two unrelated tokenizers are never compared.
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping


def tokenizer_json_path(tokenizer: str | os.PathLike, option: str = "--tokenizer") -> Path:
    """The ``tokenizer.json`` of a name ('qwen3', 'smollm2'), a directory or a file; a clear error if none."""
    text = str(tokenizer)
    p = Path(text)
    if not p.exists():
        from trkit.assets import resolve_tokenizer

        resolved = Path(resolve_tokenizer(text))
        if not resolved.exists():
            raise FileNotFoundError(f"{option} {text}: no such tokenizer directory or file; pass 'qwen3', 'smollm2', "
                                    "a directory holding tokenizer.json, or a tokenizer.json")
        p = resolved
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"{option} {text}: no tokenizer.json at {p}; pass a directory with a fast tokenizer "
                                "(tokenizer.json), 'qwen3' or 'smollm2'")
    return p


def load_backend(tokenizer: Any, option: str = "--tokenizer"):
    """A ``tokenizers.Tokenizer`` from a name ('qwen3', 'smollm2'), a directory, a tokenizer.json, or an object."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.backend_tokenizer
    p = tokenizer_json_path(tokenizer, option)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises a bare Exception with a JSON offset
        raise ValueError(f"{p} is not a valid tokenizer.json ({str(exc).splitlines()[0][:200]}): the file is "
                         "truncated or not a Hugging Face fast tokenizer; re-create or re-download it") from None


def read_documents(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Documents of a text file (one per line, blank lines skipped; read strictly by
    ``trkit.corpus.read_documents``: invalid UTF-8 is an error naming the file and line) or an
    iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        from trkit.corpus import read_documents as read

        return read(source, max_chars=None)
    return [d for d in source if d and d.strip()]


def check_extension(base: str | os.PathLike, tokenizer: str | os.PathLike):
    """Refuse to compare ``tokenizer`` with ``base`` unless it is a ``trkit vocab`` extension of it.

    Checks, before any text is encoded: ``base`` is a readable tokenizer.json; ``tokenizer`` has a
    trkit manifest of stage ``vocab`` whose file hashes match (a truncated tokenizer.json is named);
    its recorded base fingerprint is ``base``'s, every existing id is unchanged and the new ids are
    the manifest's (``trkit.embeddings.check_tokenizer_pair``). Returns the ``Extension`` and the
    loaded base tokenizer.
    """
    from trkit.embeddings import check_tokenizer_pair, load_extension

    base_json = tokenizer_json_path(base, "--base")
    base_tokenizer = load_backend(base_json, "--base")  # valid JSON and a loadable tokenizer, named if not
    ext_dir = Path(tokenizer)
    if not ext_dir.is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such directory; pass the --out of `trkit vocab`")
    try:
        ext = load_extension(ext_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"--tokenizer {ext_dir} is not a trkit vocabulary extension ({exc}); tokstats compares "
                         "an extension written by `trkit vocab` with its own base") from None
    check_tokenizer_pair(ext, base_json)
    return ext, base_tokenizer


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
    languages: Mapping[str, str] | None = None,
) -> dict:
    """Report of ``tokenizer`` against ``base`` on every source in ``texts`` ({name: file or texts}).

    Returns ``{"base_vocab_size", "vocab_size", "n_new_tokens", "sources": {name: stats}, "languages":
    {name: language}, "totals": {language: stats}, "all": stats}``. ``languages`` maps a source to its language; a source not in it
    gets ``trkit.corpus.text_language`` of its documents. ``all`` pools every source (Turkish with
    English: read the per-language ``totals`` instead).
    With ``morphology`` also the share of word-internal boundaries on suffix boundaries (slower); the
    segmenter's lexicon of plausible stems is ``lexicon`` or else the words of ``texts`` themselves.
    """
    from trkit.turkish import split_words

    b, t = load_backend(base, "--base"), load_backend(tokenizer)
    n_base = b.get_vocab_size(with_added_tokens=True)
    n_total = t.get_vocab_size(with_added_tokens=True)
    n_new = max(0, n_total - n_base)
    normalizer = t.normalizer
    report: dict = {"base_vocab_size": n_base, "vocab_size": n_total, "n_new_tokens": n_new, "sources": {}}
    documents = {name: read_documents(src) for name, src in texts.items()}
    if morphology and lexicon is None:  # plausible stems: the words of the evaluated texts themselves
        from trkit.turkish import build_lexicon

        lexicon = build_lexicon(collections.Counter(w for docs in documents.values() for d in docs
                                                    for w in split_words(d)).items())
    used_by: dict[str, set[int]] = {}
    for name, docs in documents.items():
        eb = b.encode_batch(docs, add_special_tokens=False)
        et = t.encode_batch(docs, add_special_tokens=False)
        tok_b = sum(len(e.ids) for e in eb)
        tok_t = sum(len(e.ids) for e in et)
        words = sum(len(split_words(d)) for d in docs)
        chars = sum(len(d) for d in docs)
        used = {i for e in et for i in e.ids if i >= n_base}
        used_by[name] = used
        decoded = t.decode_batch([e.ids for e in et], skip_special_tokens=False)
        rt = sum(dec != (normalizer.normalize_str(d) if normalizer else d) for d, dec in zip(docs, decoded))
        coarse = sum(not _boundaries(x.tokens) <= _boundaries(y.tokens) for x, y in zip(et, eb))
        stats = {
            "documents": len(docs),
            "chars": chars,
            "words": words,
            "base_tokens": tok_b,
            "tokens": tok_t,
            **_rates(chars, words, tok_b, tok_t, used, n_new),
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
        report.setdefault("languages", {})[name] = (languages or {}).get(name) or _language_of(docs)
    if report["sources"]:
        groups: dict[str, list[str]] = {}
        for name, language in report["languages"].items():
            groups.setdefault(language, []).append(name)
        order = sorted(groups, key=lambda g: (["Turkish", "English"].index(g) if g in ("Turkish", "English") else 2, g))
        report["totals"] = {g: _pool(report["sources"], groups[g], used_by, n_new) for g in order}
        report["all"] = _pool(report["sources"], list(report["sources"]), used_by, n_new)
    return report


_SUMMED = ("documents", "chars", "words", "base_tokens", "tokens", "roundtrip_failures", "coarsening_violations",
           "word_internal_boundaries")


def _language_of(docs: list[str]) -> str:
    from trkit.corpus import text_language

    return text_language(docs)


def _rates(chars: int, words: int, tok_b: int, tok_t: int, used: set[int], n_new: int) -> dict:
    return {
        "base_fertility": tok_b / words if words else None,
        "fertility": tok_t / words if words else None,
        "chars_per_token": chars / tok_t if tok_t else None,
        "pct_fewer": 100.0 * (1 - tok_t / tok_b) if tok_b else 0.0,
        "new_tokens_used": len(used),
        "new_tokens_used_share": len(used) / n_new if n_new else None,
        "new_tokens_never_used": n_new - len(used),
    }


def _pool(sources: Mapping[str, dict], names: list[str], used_by: Mapping[str, set[int]], n_new: int) -> dict:
    """Totals over ``names``: counts summed, rates recomputed from the sums (not averaged)."""
    tot = {k: sum(sources[n][k] for n in names) for k in _SUMMED if all(k in sources[n] for n in names)}
    used = set().union(*(used_by[n] for n in names))
    out = {"sources": len(names), **tot, **_rates(tot["chars"], tot["words"], tot["base_tokens"], tot["tokens"], used, n_new)}
    if "word_internal_boundaries" in tot:
        on = sum((sources[n]["morph_boundary_share"] or 0.0) * sources[n]["word_internal_boundaries"] for n in names)
        out["morph_boundary_share"] = on / tot["word_internal_boundaries"] if tot["word_internal_boundaries"] else None
    return out


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


TABLE_COLUMNS = (  # (report key, header, format)
    ("documents", "docs", "d"), ("words", "words", "d"), ("base_tokens", "base tok", "d"), ("tokens", "tokens", "d"),
    ("base_fertility", "base tok/word", ".3f"), ("fertility", "tok/word", ".3f"),
    ("chars_per_token", "chars/tok", ".3f"), ("pct_fewer", "% fewer", ".2f"),
    ("new_tokens_used", "new used", "d"), ("new_tokens_never_used", "never used", "d"),
    ("roundtrip_failures", "rt fail", "d"), ("coarsening_violations", "coarsen viol", "d"),
)


def format_table(report: dict) -> str:
    """A plain-text table of a ``compare`` report: one row per source, then one total per language
    (``Turkish (all)``, ``English (all)``), every column right-aligned to its widest cell."""
    rows: list[tuple[str, dict]] = list(report["sources"].items())
    totals = report.get("totals") or ({"ALL": report["all"]} if "all" in report else {})
    rows += [(f"{g} (all)" if g != "ALL" else g, st) for g, st in totals.items()]
    head = ["source", "language"] + [h for _, h, _ in TABLE_COLUMNS]
    body = []
    languages = report.get("languages", {})
    for name, st in rows:
        cells = [name, languages.get(name, "") if name in report["sources"] else ""]
        for key, _, fmt in TABLE_COLUMNS:
            v = st.get(key)
            cells.append("-" if v is None else format(v, fmt))
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head)]
    n_sources = len(report["sources"])
    for k, cells in enumerate(body):
        if k == n_sources and totals:
            out.append("  ".join("-" * w for w in widths))
        out.append(line(cells))
    return "\n".join(out)


def add_arguments(parser) -> None:
    from trkit.corpus import TEXT_HELP

    parser.add_argument("--base", default="qwen3", help="base tokenizer: qwen3 | smollm2 | directory | tokenizer.json")
    parser.add_argument("--tokenizer", required=True,
                        help="extended tokenizer directory written by `trkit vocab` (its base must be --base)")
    parser.add_argument("--text", nargs="+", default=["validation"], help=TEXT_HELP)
    parser.add_argument("--split", default="validation", choices=("validation", "test", "train"),
                        help="the split of a `trkit corpus` directory given to --text (default validation)")
    parser.add_argument("--morphology", action="store_true", help="also the share of boundaries on suffix boundaries")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_cli(args) -> int:
    import sys

    from trkit.corpus import describe_sources, text_sources

    sources = text_sources(args.text, split=args.split)  # every path checked before any tokenizer is loaded
    texts = {s.name: s.read(max_chars=None) for s in sources}
    _, base = check_extension(args.base, args.tokenizer)
    print("texts (name, language, from):\n" + describe_sources(sources), file=sys.stderr)
    report = compare(base, args.tokenizer, texts, morphology=args.morphology,
                     languages={s.name: s.language for s in sources})
    report["texts"] = {s.name: s.origin for s in sources}
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_table(report))
    return 0
