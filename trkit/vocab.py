"""Vocabulary extension by continued BPE: new Turkish merges appended to a byte-level BPE tokenizer.

What it does. The base tokenizer's own pipeline (normaliser, pre-tokeniser) splits the corpus into
words; each distinct word starts from the base tokenizer's own segmentation (byte-level token ids);
then, as in BPE training (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units"), the best adjacent pair is merged greedily, counts updated incrementally, until N
new tokens exist. The merges are **appended** after every existing merge and the new tokens get
ids ``len(base), len(base)+1, ...``. This is the continued-BPE extension of Purason et al. 2025
("Teaching Old Tokenizers New Words", arXiv 2512.03989). Because a BPE encoder applies merges in
rank order and every new rank is larger than every old one, the base merges all fire first: the
extended segmentation is the base segmentation with some adjacent tokens glued together
(*coarsening*), so existing ids, special tokens, the chat template and English are untouched
except where a new merge applies.

Pair score. Each distinct word ``w`` seen ``f_w`` times in source ``s`` weighs ``f_w ** word_exponent``
(default 1: plain counts; 0.5 damps very frequent words); ``c_s(a,b)`` is the summed weight of the
adjacent occurrences of ``(a, b)`` in source ``s`` and ``T_s = sum_pairs c_s`` its source's total:

* ``selection="frequency"``: ``score = sum_s c_s(a,b)`` (plain BPE).
* ``selection="balanced"``: ``score = sum_s log1p(k_s * c_s(a,b))`` with
  ``k_s = (T / mean_T) * (mean_T / T_s) ** balance_exponent``. With ``balance_exponent=1`` every
  source is scaled to the same total ``T`` (the "balanced sources" rule of the issue); the default
  0.5 balances halfway, so a 0.2 MB source is not weighted like a 2.5 MB one. The log1p makes a pair
  seen in every source beat a pair frequent in one source only: that is what carries over to
  registers the corpus does not contain (measured in ``benchmarks/bench_vocab.py``). With a single
  source it orders pairs as ``frequency`` does.
* ``morphology=True`` additionally multiplies each occurrence's weight by ``morphology_penalty``
  when the junction between ``a`` and ``b`` lies on a stem|suffix boundary proposed by
  ``trkit.turkish.suffix_boundaries`` (a curated inventory of Turkish suffix allomorphs), so merges
  that glue a suffix onto a stem need more evidence than merges inside a stem or inside a suffix
  chain.

Which rule is the default (``benchmarks/results/vocab_generalization.json``, 20k merges, Qwen3): on
Turkish software messages (a register absent from the corpus) and with each corpus source held out in
turn, ``balanced`` with ``balance_exponent=0.5`` gives the largest mean reduction (29.5% vs 29.0% for
plain frequency and 29.1% for equal source totals) with fewer never-used new tokens (57.4% vs 59.0%),
for 0.7 points less on the in-domain validation split. The morphology penalty raises the share of
word-internal boundaries that fall on suffix boundaries (0.110 -> 0.124) but costs fertility and
unseen-register reduction under every rule, so it is off by default.

Word-count sources. BPE training needs only word counts, so a source can also be a frequency table
(``word<TAB>count`` lines: a user's own list, or the offline Turkish tables ``wordfreq`` and ``trnlp``
of ``trkit.assets``). Its counts enter the pair statistics directly, without pseudo-text: each listed
word ``w`` with count ``n`` is pre-tokenised as ``" " + w`` (inside running text a word carries its
space) and every resulting piece gains ``n``. Each table is its own source in the balanced score,
rescaled to ``table_weight`` times the mean word total of the running-text sources (trnlp's raw total,
485 M occurrences, is 2,000 times that of a default-corpus source), and keeps its ``max_table_words``
most frequent words (memory and time grow with distinct words). The tables are lowercase and running text is
not: ``table_casing="text"`` moves a share of each word's count to its capitalised form (Turkish İ/I
rules), the share the running text shows for that word, shrunk towards the overall share of capitalised
words (a prior worth ``CASE_PRIOR_WEIGHT`` occurrences); ``"lower"`` keeps the table as listed.
Measured (``benchmarks/results/vocab_generalization_tables.json``, 20k merges on Qwen3, mean % fewer
tokens / % of new tokens never used over Turkish software messages and each default source held out in
turn): running text alone 29.50 / 57.4; + wordfreq 30.92 / 53.9; + trnlp 30.85 / 53.8; + both,
lowercase 31.12 / 52.6; + both, cased from the text 31.36 / 52.6 (better on 4 of the 5 registers), English
unchanged (0.00%) in every variant, in-domain tokens per word 1.619 -> 1.627. So ``"default"`` is the
running text plus both tables, cased from the text. Table weights 0.3, 1 and 3 and 200k vs 500k words
per table were within 0.1 point of each other on three of the registers, so weight 1 and 200k words
(trnlp's forms seen 58 times or more) are the defaults; the training and validation text of later
stages stay running text only (``trkit.assets.corpus_files``).

Candidates. ``candidates=`` (``--candidates FILE``: a SentencePiece ``.model`` / ``.vocab`` or a token
list) makes the new tokens from an existing vocabulary instead of learning them
(:func:`candidate_merges`): each candidate that the pre-tokeniser keeps in one piece gets the merges
that build it from the base's byte-level tokens, most frequent candidates (in the corpus) first.
Measured against learned merges on the same unseen registers (new tokens from a 32k SentencePiece
model trained with the ``sentencepiece`` trainer on the same running text): unigram pieces 26.37 / 62.4,
BPE pieces 27.41 / 60.2, learned merges 29.50 / 57.4. Learned merges are better; candidates are for
users who must reproduce an existing vocabulary's pieces, not a way to a better one.

Reading. Files are split into documents on "\n" only ("\r" before it is dropped; "\r", \x0b, \x0c,
U+2028 and the like stay inside a document, as in ``trkit corpus``), a UTF-8 BOM at the start of a
file is dropped, and lines longer than ``max_line_bytes`` or not valid UTF-8 are skipped and counted
(``corpus_dropped`` in the manifest), so memory stays bounded whatever the input. Inputs of 64 MB or
more are counted in worker processes (one per core, at most 4), since pre-tokenisation, not merging,
is where the time goes on large corpora (``benchmarks/bench_vocab.py --part scale``).

Data structures (why it is fast in pure Python): words are counted once (``collections.Counter``
over the Rust pre-tokeniser's output); each (word, source) entry is a list of integer ids with a
parallel list of junction weights; ``counts`` maps an integer pair key ``a * 2**21 + b`` to its
per-source counts; ``where`` maps a pair to the entries holding it; a max-heap of scores with lazy
invalidation (a popped score that no longer matches the live count is pushed back; counts of old
pairs only ever decrease, so a stale score is an upper bound). A merge touches only the entries that
contain the pair, so the total work is bounded by the number of symbols in distinct words, not by
``N x corpus``.

Guarantees kept by construction and checked in tests: a merge whose string already exists in the
vocabulary is skipped (no duplicate tokens), and a new token is only accepted if its own string
encodes to it (checked by replaying the base model and the merges learned so far), so no new token
is unreachable. The 26 added tokens of Qwen3 are also written into the BPE vocabulary at their ids:
transformers 5 rebuilds Qwen2Tokenizer from ``vocab`` + ``merges`` and would otherwise renumber them
after the new tokens.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

_KEY = 1 << 21  # pair key = left * _KEY + right (vocabularies stay below 2M ids)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SELECTIONS = ("frequency", "balanced")
DEFAULT_SELECTION = "balanced"
DEFAULT_MORPHOLOGY = False  # measured: no gain on unseen registers (see the docstring)
DEFAULT_MORPHOLOGY_PENALTY = 0.5
DEFAULT_BALANCE_TOTAL = 1e5
DEFAULT_WORD_EXPONENT = 1.0
DEFAULT_BALANCE_EXPONENT = 0.5
DEFAULT_MAX_LINE_BYTES = 4_000_000  # as trkit corpus: longer lines are skipped while reading, never held whole
WORD_TABLES = ("wordfreq", "trnlp")  # the offline Turkish word-frequency tables (trkit.assets.word_table_file)
DEFAULT_CORPUS_TABLES: tuple[str, ...] = WORD_TABLES  # the tables 'default' adds to the running text (measured, see above)
SOURCE_NAMES = ("default", "default-text", *WORD_TABLES)
DEFAULT_TABLE_WEIGHT = 1.0
TABLE_CASINGS = ("lower", "text")
DEFAULT_TABLE_CASING = "text"
CASE_PRIOR_WEIGHT = 4.0
BATCH_CHARS, WORKER_BATCH_CHARS = 1 << 20, 4 << 20  # characters of documents counted per batch / per worker task
DEFAULT_MAX_TABLE_WORDS = 200_000  # bounds the learner's memory (trnlp: its forms seen 58 times or more)


# --------------------------------------------------------------------------------------------
# Base tokenizer: load, check, fingerprint
# --------------------------------------------------------------------------------------------


@dataclass
class BaseTokenizer:
    """A byte-level BPE tokenizer as files: where it lives, its parsed tokenizer.json, its backend."""

    name: str
    directory: Path
    tokenizer_json: dict
    backend: Any  # tokenizers.Tokenizer
    sha256: str

    @property
    def model(self) -> dict:
        return self.tokenizer_json["model"]

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _byte_level_in(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_byte_level_in(c) for c in component.get("pretokenizers", []) or component.get("decoders", []) or [])


def check_supported(tokenizer_json: dict, name: str = "tokenizer") -> None:
    """Refuse anything that is not a byte-level BPE fast tokenizer, with a message saying why."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"{name}: model type {model.get('type')!r} is not supported; vocabulary extension by continued BPE "
            "needs a byte-level BPE tokenizer (Qwen, GPT-2, SmolLM2, Llama-3 style). SentencePiece/Unigram/WordPiece "
            "tokenizers need a different method."
        )
    if not (_byte_level_in(tokenizer_json.get("pre_tokenizer")) and _byte_level_in(tokenizer_json.get("decoder"))):
        raise ValueError(
            f"{name}: BPE without a ByteLevel pre-tokenizer and decoder (e.g. a SentencePiece-converted BPE with "
            "byte fallback) is not supported; use a byte-level BPE tokenizer such as Qwen3's or SmolLM2's."
        )
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(
            f"{name}: BPE with dropout or subword prefix/suffix markers is not supported; use a plain byte-level BPE."
        )


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def _tokenizer_json_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: pass a directory holding a fast tokenizer's tokenizer.json (save it with "
            "tokenizer.save_pretrained(dir)) or the tokenizer.json file itself."
        )
    return p


def tokenizer_fingerprint(path: str | os.PathLike | dict) -> str:
    """sha256 of a canonical JSON of a BPE model's vocabulary, merges and added tokens.

    Stable across re-saves: key order, merge notation ("a b" vs ["a","b"]) and whether added tokens
    are also listed in the model vocabulary do not change it; any change of an id, a merge or an
    added token does. Accepts a directory, a tokenizer.json path, or the parsed JSON.
    """
    tj = path if isinstance(path, dict) else json.loads(_tokenizer_json_path(path).read_text(encoding="utf-8"))
    model = tj.get("model", {})
    vocab = dict(model.get("vocab") or {})
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in tj.get("added_tokens", []))
    for i, content, _ in added:
        vocab[content] = i
    canonical = {
        "type": model.get("type"),
        "vocab": sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])),
        "merges": [list(_merge_pair(m)) for m in model.get("merges") or []],
        "added_tokens": [list(a) for a in added],
    }
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            name,
            allow_patterns=["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                            "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"],
        )
    )


def load_base(base: Any) -> BaseTokenizer:
    """Resolve ``base`` (offline name 'qwen3'/'smollm2', a directory, a hub name, or a loaded fast tokenizer)."""
    from tokenizers import Tokenizer

    if hasattr(base, "backend_tokenizer"):  # a transformers fast tokenizer object
        tmp = Path(tempfile.mkdtemp(prefix="trkit-base-"))
        base.save_pretrained(tmp)
        name = getattr(base, "name_or_path", "") or str(tmp)
        directory = tmp
    else:
        name = str(base)
        p = Path(base)
        if p.is_dir() or p.is_file():
            directory = p if p.is_dir() else p.parent
        else:
            try:
                from trkit.assets import resolve_tokenizer
            except ImportError:  # pragma: no cover - assets module ships with trkit
                resolve_tokenizer = None
            resolved = resolve_tokenizer(name) if resolve_tokenizer else name
            rp = Path(resolved)
            directory = rp if rp.is_dir() else _hub_snapshot(str(resolved))
    tj_path = _tokenizer_json_path(directory)
    text = tj_path.read_text(encoding="utf-8")
    tj = json.loads(text)
    check_supported(tj, name)
    backend = Tokenizer.from_str(text)
    return BaseTokenizer(name=name, directory=Path(directory), tokenizer_json=tj, backend=backend,
                         sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


# --------------------------------------------------------------------------------------------
# Corpus -> word counts per source
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordCountTable:
    """A word-frequency table as a corpus source: a UTF-8 file of ``word<TAB>count`` lines."""

    path: Path
    name: str = ""

    @property
    def source_name(self) -> str:
        return self.name or self.path.stem


def _default_text_files() -> dict[str, Path]:
    from trkit.assets import corpus_files

    return {k: Path(v) for k, v in corpus_files().items()}


def _word_table(name: str) -> WordCountTable:
    from trkit.assets import word_table_file

    return WordCountTable(Path(word_table_file(name)), name)


def _named_sources(name: str) -> dict[str, Any]:
    """'default' (the vocabulary stage's default corpus), 'default-text' (the running text only), or a table."""
    if name == "default-text":
        return dict(_default_text_files())
    if name == "default":
        return {**_default_text_files(), **{t: _word_table(t) for t in DEFAULT_CORPUS_TABLES}}
    return {name: _word_table(name)}


def _is_path(x: Any) -> bool:
    return isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x and len(x) < 4096 and os.path.exists(x))


def corpus_sources(texts_or_files: Any) -> dict[str, Iterable[str] | Path | WordCountTable]:
    """Normalise the many accepted corpus forms to ``{source name: path, documents or WordCountTable}``.

    Accepted: ``"default"`` (the offline running text, one source per file, plus the word-frequency
    tables of ``DEFAULT_CORPUS_TABLES``), ``"default-text"`` (the running text only), ``"wordfreq"`` /
    ``"trnlp"`` (one offline table), a path (a text/JSONL/parquet file, a ``.tsv`` of ``word<TAB>count``
    lines, or a directory written by ``trkit corpus``), a list of these (one source per file), a list of
    strings (texts, one source), a :class:`WordCountTable`, or a mapping ``{source: any of these}``.
    """
    if isinstance(texts_or_files, WordCountTable):
        return {texts_or_files.source_name: texts_or_files}
    if isinstance(texts_or_files, Mapping):
        out: dict[str, Any] = {}
        for k, v in texts_or_files.items():
            sub = corpus_sources(v)
            if len(sub) == 1:
                out[str(k)] = next(iter(sub.values()))
            else:
                out.update({f"{k}/{kk}": vv for kk, vv in sub.items()})
        return out
    if isinstance(texts_or_files, str) and texts_or_files in SOURCE_NAMES:
        return _named_sources(texts_or_files)
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    items = list(texts_or_files)
    for x in items:
        if isinstance(x, str) and not os.path.exists(x) and not any(c.isspace() for c in x) \
                and x.lower().endswith((".txt", ".jsonl", ".json", ".parquet", ".tsv")):
            raise FileNotFoundError(f"{x}: no such file (pass existing corpus files, 'default', or texts)")
    if not items:
        raise ValueError("the corpus is empty: pass 'default', file paths, or a list of Turkish texts")
    named = [x for x in items if isinstance(x, str) and x in SOURCE_NAMES]
    rest = [x for x in items if not (isinstance(x, str) and x in SOURCE_NAMES)]
    if named and all(_is_path(x) or isinstance(x, WordCountTable) for x in rest):
        out = {}
        for n in named:
            out.update(_named_sources(n))
        for k, v in corpus_sources(rest).items() if rest else ():
            out[k if k not in out else f"{k}-{len(out)}"] = v
        return out
    paths = [x for x in items if _is_path(x) or isinstance(x, WordCountTable)]
    if len(paths) == len(items):
        out = {}
        for x in paths:
            if isinstance(x, WordCountTable):
                out[x.source_name if x.source_name not in out else str(x.path)] = x
                continue
            p = Path(x)
            if p.is_dir():
                if not (p / "dataset_dict.json").exists() and not (p / "dataset_info.json").exists():
                    raise ValueError(f"{p} is a directory but not a dataset written by `trkit corpus`; pass its "
                                     "text files instead, or run `trkit corpus --input ... --out DIR` first")
                for src, docs in _load_corpus_dir(p).items():
                    out[src if src not in out else f"{p.name}/{src}"] = docs
                continue
            key = p.stem if p.stem not in out else str(p)
            out[key] = WordCountTable(p, key) if p.suffix.lower() == ".tsv" else p
        return out
    if paths:
        raise ValueError("mix of file paths and texts: pass either paths or texts (or a dict {source: ...})")
    return {"texts": items}


def _input_paths(texts_or_files: Any) -> list[str]:
    """Every existing path among what the caller passed (for the --out checks; nothing is read)."""
    if isinstance(texts_or_files, WordCountTable):
        return [str(texts_or_files.path)]
    if isinstance(texts_or_files, Mapping):
        return [p for v in texts_or_files.values() for p in _input_paths(v)]
    if isinstance(texts_or_files, (str, os.PathLike)):
        return [os.fspath(texts_or_files)] if _is_path(texts_or_files) else []
    if isinstance(texts_or_files, Iterable) and not isinstance(texts_or_files, (bytes, Iterator)):
        return [p for x in texts_or_files if isinstance(x, (str, os.PathLike, WordCountTable)) for p in _input_paths(x)]
    return []


class _Progress:
    """Bytes read so far, handed to a tqdm bar in steps of about 1 MB (a per-line update would cost more
    than the counting)."""

    def __init__(self, bar):
        self.bar, self.pending = bar, 0

    def add(self, n: int) -> None:
        self.pending += n
        if self.pending >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.bar.update(self.pending)
            self.pending = 0


def _read_lines(path: Path, max_line_bytes: int, dropped: collections.Counter, progress: _Progress | None = None,
                strict: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a file split on b"\\n" only; a UTF-8 BOM at the start of the file and a
    trailing "\\r" are dropped. Lines longer than ``max_line_bytes`` and lines that are not UTF-8 are
    skipped and counted in ``dropped`` (with ``strict``: a ValueError naming the line), so no line is ever
    held whole in memory beyond the cap."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            lineno += 1
            if progress is not None:
                progress.add(len(line))
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while True:  # discard the rest of the line in bounded pieces
                    rest = f.readline(1 << 20)
                    if progress is not None:
                        progress.add(len(rest))
                    if not rest or rest.endswith(b"\n"):
                        break
                if strict:
                    raise ValueError(f"{path}:{lineno}: line longer than {max_line_bytes:,} bytes (max_line_bytes)")
                dropped["too_long_line"] += 1
                continue
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
                dropped["invalid_utf8"] += 1
                continue
            yield lineno, text.rstrip("\r\n")


def _iter_file_docs(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, dropped: collections.Counter | None = None,
                    progress: _Progress | None = None) -> Iterator[str]:
    """Documents of a file: one per line (.txt), the "text" field (.jsonl/.json lines), parquet "text"."""
    from trkit.corpus import jsonl_text

    dropped = collections.Counter() if dropped is None else dropped
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (it has {pf.schema_arrow.names}); pass a parquet file "
                             "with the documents in 'text'")
        rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if isinstance(t, str):
                    if t.strip():
                        yield t
                elif t is not None:
                    dropped["not_text"] += 1
            if progress is not None:
                progress.add(size * batch.num_rows // rows)
        return
    for _, line in _read_lines(path, max_line_bytes, dropped, progress):
        if suffix in (".jsonl", ".json"):
            line = jsonl_text(line, "text", dropped)
            if line is None:
                continue
        if line.strip():
            yield line


def _load_corpus_dir(path: Path) -> dict[str, list[str]]:
    """A directory written by ``trkit corpus``: its train split, grouped by the ``source`` column."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # a damaged or half-written dataset directory
        raise ValueError(f"{path}: cannot be read as a `trkit corpus` dataset ({type(exc).__name__}: {exc}); "
                         "re-run `trkit corpus` to write it again") from None
    train = ds["train"] if hasattr(ds, "keys") and "train" in ds else ds
    if "text" not in train.column_names:
        raise ValueError(f"{path}: its train split has no 'text' column; pass a directory written by `trkit corpus`")
    groups: dict[str, list[str]] = collections.defaultdict(list)
    sources = train["source"] if "source" in train.column_names else ["corpus"] * len(train)
    for text, src in zip(train["text"], sources):
        groups[src].append(text)
    return dict(groups)


def read_word_counts(path: str | os.PathLike, max_words: int | None = None,
                     max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[dict[str, int], dict]:
    """A ``word<TAB>count`` file -> ``({word: count}, stats)``, its ``max_words`` most frequent words.

    Strict: a line without exactly one tab, an empty word, or a count that is not a non-negative
    integer is a ValueError naming the file and line. Blank lines are skipped, a word listed twice
    gets the sum of its counts, words with count 0 are left out; a table with no positive count is an
    error. ``stats``: lines, distinct words, kept words and their total count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such word-count file (expected word<TAB>count lines)")
    counts: dict[str, int] = {}
    lines = 0
    for lineno, line in _read_lines(path, max_line_bytes, collections.Counter(), strict=True):
        if not line.strip():
            continue
        lines += 1
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'word<TAB>count', got {line[:80]!r} "
                             f"({len(fields)} tab-separated fields)")
        word, count = fields[0].strip(), fields[1].strip()
        if not word:
            raise ValueError(f"{path}:{lineno}: empty word before the tab")
        if not (count.isascii() and count.isdigit()):
            what = "negative" if count[:1] == "-" and count[1:].isascii() and count[1:].isdigit() else "not an integer"
            raise ValueError(f"{path}:{lineno}: count {count[:40]!r} of {word[:40]!r} is {what}; counts must be "
                             "non-negative integers")
        n = int(count)
        if n:
            counts[word] = counts.get(word, 0) + n
    if not counts:
        raise ValueError(f"{path}: the word-count table is empty (no line 'word<TAB>count' with a count > 0)")
    distinct = len(counts)
    if max_words is not None and distinct > max_words:
        counts = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:max_words])  # stable: file order on ties
    return counts, {"lines": lines, "distinct_words": distinct, "words": len(counts), "total": sum(counts.values())}


@dataclass
class WordCounts:
    """Distinct pre-tokenised words (byte-level strings) with their count in each source."""

    sources: list[str]
    counts: list[collections.Counter]  # one Counter per source: word -> count
    corpus_sha256: str
    documents: list[int]  # running text: documents read; word-count table: words kept
    bytes: list[int]
    kinds: list[str] = field(default_factory=list)  # "text" or "word counts", per source
    dropped: dict[str, int] = field(default_factory=dict)  # lines skipped while reading, by reason
    tables: dict[str, dict] = field(default_factory=dict)  # per word-count source: read_word_counts stats

    def __post_init__(self) -> None:
        if not self.kinds:
            self.kinds = ["text"] * len(self.sources)

    def total(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for x in self.counts:
            c.update(x)
        return c


# Qwen2/Qwen3's pre-tokeniser: this Split regex (isolated), then ByteLevel without its own regex. For such a
# tokenizer the same regex in Python's ``regex`` module splits text 4x faster than ``pre_tokenize_str`` (which
# builds an offsets tuple per piece); only documents whose characters all lie in ranges where the two engines
# were checked to agree (tests/test_vocab.py: every character of these ranges in many contexts, random texts)
# take that path, every other document goes through the tokenizer itself, so the counts are the same.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                      r"\s+(?!\S)|\s+")
# Latin, IPA, combining marks, Greek, Cyrillic, punctuation, currency, letterlike (not U+2070-209F: the engines
# disagree on its unassigned U+208F)
FAST_SPLIT_RANGES = "\x00-\u052f\u1e00-\u1eff\u2000-\u206f\u20a0-\u214f"
_OUTSIDE_FAST_RANGES = re.compile(f"[^{FAST_SPLIT_RANGES}]")


def fast_splitter(tokenizer_json: Mapping) -> Any:
    """``regex.findall`` of the base's pre-tokeniser when it is Qwen's Split + ByteLevel (else None)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if not (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") == QWEN_SPLIT_PATTERN
            and split.get("behavior") == "Isolated" and not split.get("invert")):
        return None
    if not (byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex", True)):
        return None
    try:
        import regex
    except ImportError:  # transformers depends on it; without it the tokenizer's own path is used
        return None
    return regex.compile(QWEN_SPLIT_PATTERN).findall


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, str]:
    """str.translate table: a Latin-1 character (one byte) -> its byte-level character."""
    return {b: c for c, b in byte_decoder().items()}


def _count_docs(normalizer, pre_tokenizer, docs: list[str], findall=None, nfc: bool = False) -> collections.Counter:
    """Pre-tokenised word counts (byte-level strings) of ``docs``, as the base tokenizer splits them.
    ``nfc``: the normaliser is plain NFC, so a document in the checked ranges that is already NFC is left
    as it is (Python's and the tokenizer's Unicode tables agree there)."""
    words: list[str] = []
    fast: list[str] = []
    is_normalized = unicodedata.is_normalized
    for doc in docs:
        in_ranges = findall is not None and not _OUTSIDE_FAST_RANGES.search(doc)
        if normalizer is not None and not (nfc and in_ranges and is_normalized("NFC", doc)):
            doc = normalizer.normalize_str(doc)
            in_ranges = findall is not None and not _OUTSIDE_FAST_RANGES.search(doc)
        if in_ranges:
            fast.extend(findall(doc))
        else:
            words.extend(w for w, _ in pre_tokenizer.pre_tokenize_str(doc))
    counts = collections.Counter(words)
    if fast:
        table = _byte_level_table()
        for piece, n in collections.Counter(fast).items():  # byte-level mapping once per distinct piece
            counts[piece.encode("utf-8").decode("latin-1").translate(table)] += n
    return counts


_WORKER: tuple = ()


def _worker_init(tokenizer_json: str) -> None:
    global _WORKER
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tj = json.loads(tokenizer_json)
    _WORKER = (tok.normalizer, tok.pre_tokenizer, fast_splitter(tj), tj.get("normalizer") == {"type": "NFC"})


def _worker_count(docs: list[str]) -> collections.Counter:
    normalizer, pre_tokenizer, findall, nfc = _WORKER
    return _count_docs(normalizer, pre_tokenizer, docs, findall, nfc)


def _auto_workers(n_bytes: int) -> int:
    """Worker processes for counting: one per core (at most 4) for inputs of 64 MB or more, else none
    (starting the workers costs about a second)."""
    if n_bytes < 64 << 20:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _capitalise(word: str) -> str:
    from trkit.turkish import upper

    return upper(word[:1]) + word[1:]


def _case_shares(text: Mapping[str, float]) -> tuple[float, Any]:
    """From running text: the overall share of capitalised words, and a per-word share with that prior."""
    dec = byte_decoder()
    cap = low = 0
    for w, n in text.items():
        if len(w) > 1 and w[0] == "Ġ" and w[1] in dec:  # a space-led word; its first letter decides
            try:
                first = bytes(dec[c] for c in w[1:5]).decode("utf-8", errors="ignore")[:1]
            except KeyError:
                continue
            if first.isupper():
                cap += n
            elif first.islower():
                low += n
    prior = cap / (cap + low) if cap + low else 0.0

    def share(lower_piece: str, upper_piece: str) -> float:
        c, lo = text.get(upper_piece, 0), text.get(lower_piece, 0)
        return (c + CASE_PRIOR_WEIGHT * prior) / (c + lo + CASE_PRIOR_WEIGHT)

    return prior, share


def table_word_counts(
    base: BaseTokenizer,
    path: str | os.PathLike,
    text_counts: Mapping[str, float] | None = None,
    *,
    casing: str = DEFAULT_TABLE_CASING,
    max_words: int | None = DEFAULT_MAX_TABLE_WORDS,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> tuple[collections.Counter, dict]:
    """A ``word<TAB>count`` table as pre-tokenised word counts: each word ``w`` with count ``n`` adds ``n``
    to every piece of ``" " + w``; with ``casing="text"`` the share of ``w`` that ``text_counts`` (running
    text's pre-tokenised word counts) shows capitalised goes to the pieces of the capitalised form."""
    from trkit.artifacts import sha256_file

    if casing not in TABLE_CASINGS:
        raise ValueError(f"table_casing must be one of {TABLE_CASINGS}, got {casing!r}")
    counts, stats = read_word_counts(path, max_words, max_line_bytes)
    normalizer, pre = base.backend.normalizer, base.backend.pre_tokenizer

    def pieces(word: str) -> list[str]:
        text = " " + word
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text) if normalizer is not None else text)]

    prior, share = _case_shares(text_counts) if casing == "text" and text_counts else (0.0, None)
    c: collections.Counter = collections.Counter()
    for word, n in counts.items():
        low = pieces(word)
        if share is not None and low:
            cap_word = _capitalise(word)
            if cap_word != word:
                cap = pieces(cap_word)
                p = share(low[0], cap[0])
                for w in cap:
                    c[w] += n * p
                n = n * (1 - p)
        for w in low:
            c[w] += n
    stats = {**stats, "sha256": sha256_file(path), "casing": casing}
    if share is not None:
        stats["capitalised_share_prior"] = round(prior, 4)
    return c, stats


def count_words(
    base: BaseTokenizer,
    texts_or_files: Any,
    progress: bool = True,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_table_words: int | None = DEFAULT_MAX_TABLE_WORDS,
    table_casing: str = DEFAULT_TABLE_CASING,
    workers: int | None = None,
) -> WordCounts:
    """Normalise and pre-tokenise every document exactly as ``base`` does, counting words per source.

    Running-text sources come first (in worker processes for large inputs, ``workers``: None = auto,
    1 = in this process); each word-count table then adds its counts to the pieces of " word" (see the
    module docstring), with ``table_casing`` "lower" (as listed) or "text" (a share moved to the
    capitalised form, taken from the running text). A progress bar shows the bytes read.
    """
    from trkit.progress import tqdm

    if table_casing not in TABLE_CASINGS:
        raise ValueError(f"table_casing must be one of {TABLE_CASINGS}, got {table_casing!r}")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
    sources = corpus_sources(texts_or_files)
    text_names = sorted(n for n, s in sources.items() if not isinstance(s, WordCountTable))
    table_names = sorted(n for n, s in sources.items() if isinstance(s, WordCountTable))
    sizes = [(s.path if isinstance(s, WordCountTable) else s).stat().st_size if isinstance(s, (Path, WordCountTable))
             else None for s in sources.values()]
    text_bytes = sum(sz or 0 for n, sz in zip(sources, sizes) if n in text_names)
    n_workers = _auto_workers(text_bytes) if workers is None else max(1, workers)
    normalizer, pre = base.backend.normalizer, base.backend.pre_tokenizer
    findall = fast_splitter(base.tokenizer_json)
    nfc = base.tokenizer_json.get("normalizer") == {"type": "NFC"}
    bar = tqdm(total=None if None in sizes else sum(sizes), desc="counting words", unit="B", unit_scale=True,
               disable=not progress, mininterval=0.5)
    prog = _Progress(bar)
    dropped: collections.Counter = collections.Counter()
    per_source: dict[str, tuple[collections.Counter, int, int, str]] = {}  # counts, documents, bytes, sha256

    # 1. running text, in batches of documents (larger ones for worker processes: fewer results to merge)
    pool = None
    batch_chars = BATCH_CHARS if n_workers == 1 else WORKER_BATCH_CHARS
    if n_workers > 1:
        import concurrent.futures
        import multiprocessing

        # fork where there is one (Linux, Colab): a spawned worker would re-run a script's main module
        methods = multiprocessing.get_all_start_methods()
        pool = concurrent.futures.ProcessPoolExecutor(
            n_workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else "spawn"),
            initializer=_worker_init,
            initargs=(json.dumps(base.tokenizer_json, ensure_ascii=False),))
    try:
        for name in text_names:
            src = sources[name]
            docs = _iter_file_docs(src, max_line_bytes, dropped, prog) if isinstance(src, Path) else iter(src)
            h = hashlib.sha256()
            c: collections.Counter = collections.Counter()
            pending: list = []  # futures of the worker processes, oldest first
            n = b = chars = 0
            batch: list[str] = []

            def count(batch: list[str], last: bool) -> None:
                if pool is None:
                    c.update(_count_docs(normalizer, pre, batch, findall, nfc))
                    return
                if batch:
                    pending.append(pool.submit(_worker_count, batch))
                while pending and (last or len(pending) >= 2 * n_workers):  # at most 2 batches per worker queued
                    c.update(pending.pop(0).result())

            for doc in docs:
                if not isinstance(doc, str):
                    raise ValueError(f"source {name!r} yielded a {type(doc).__name__}, expected str documents")
                try:
                    raw = doc.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates in a Python string: not text
                    dropped["invalid_utf8"] += 1
                    continue
                if not isinstance(src, Path):
                    if not doc.strip():
                        continue
                    prog.add(len(raw))
                h.update(raw + b"\n")
                n += 1
                b += len(raw)
                batch.append(doc)
                chars += len(doc)
                if chars >= batch_chars:
                    count(batch, last=False)
                    batch, chars = [], 0
            count(batch, last=True)
            per_source[name] = (c, n, b, h.hexdigest())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    # 2. word-count tables: " word" pre-tokenised, each piece gets the word's count
    text_total: collections.Counter = collections.Counter()
    if table_names and table_casing == "text":
        for name in text_names:
            text_total.update(per_source[name][0])
    tables: dict[str, dict] = {}
    for name in table_names:
        table = sources[name]
        c, stats = table_word_counts(base, table.path, text_total, casing=table_casing, max_words=max_table_words,
                                     max_line_bytes=max_line_bytes)
        prog.add(table.path.stat().st_size)
        tables[name] = stats
        per_source[name] = (c, stats["words"], table.path.stat().st_size, stats["sha256"])
    prog.flush()
    bar.close()

    names = sorted(per_source)
    if not any(per_source[n][0] for n in names):
        why = f" ({sum(dropped.values())} lines dropped: {_dropped_text(dropped)})" if dropped else ""
        raise ValueError(f"the corpus is empty (no non-blank documents were read){why}: check the paths / texts "
                         "you passed")
    h = hashlib.sha256()
    for name in names:  # one hash over every source: its name, then its documents' (or table's) hash
        h.update(f"\x00source\x00{name}\x00{per_source[name][3]}".encode("utf-8"))
    return WordCounts(names, [per_source[n][0] for n in names], h.hexdigest(), [per_source[n][1] for n in names],
                      [per_source[n][2] for n in names],
                      ["word counts" if n in tables else "text" for n in names], dict(dropped), tables)


def _dropped_text(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))


# --------------------------------------------------------------------------------------------
# Merge learning
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes for chr(256 + k) in byte order (Radford et al. 2019), so one character = one byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, k = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + k)] = b
            k += 1
    return out


def byte_level_to_text(token: str) -> bytes:
    """The raw bytes a byte-level token string stands for."""
    dec = byte_decoder()
    return bytes(dec[c] for c in token)


def stem_boundaries(word_counts: Mapping[str, int], words: Iterable[str], min_count: int = 2) -> dict[str, int]:
    """Byte offset of the stem|suffix boundary inside each byte-level ``word`` (words without one are left out).

    The lexicon that decides plausible stems is the corpus itself (``word_counts``); only words seen at
    least ``min_count`` times are segmented (rarer ones barely move pair counts).
    """
    from trkit.turkish import build_lexicon, segment

    texts = {}
    for w, n in word_counts.items():
        try:
            texts[w] = byte_level_to_text(w).decode("utf-8")
        except (UnicodeDecodeError, KeyError):
            continue
    lexicon = build_lexicon(((t, word_counts[w]) for w, t in texts.items()), min_count=min_count)
    out: dict[str, int] = {}
    for w in words:
        t = texts.get(w)
        if t is None or word_counts[w] < min_count:
            continue
        core = t.lstrip()
        prefix = t[: len(t) - len(core)]
        if core[:1] and not core[0].isalpha():
            prefix, core = prefix + core[0], core[1:]
        parts = segment(core, lexicon)
        if len(parts) > 1 and core.isalpha():
            out[w] = len((prefix + core[: len(parts[0])]).encode("utf-8"))
    return out


def _apply_merges(ids: list[int], ranks: Mapping[int, tuple[int, int]]) -> list[int]:
    """Apply rank-ordered merges to one word (lowest rank first, leftmost first), as the BPE encoder does."""
    ids = list(ids)
    while len(ids) > 1:
        best = None
        for i in range(len(ids) - 1):
            r = ranks.get(ids[i] * _KEY + ids[i + 1])
            if r is not None and (best is None or r[0] < best[0]):
                best = (r[0], i, r[1])
        if best is None:
            break
        _, i, new = best
        ids[i : i + 2] = [new]
        # further occurrences of the same pair are handled by the next iterations (leftmost first)
    return ids


@dataclass
class LearnedMerges:
    merges: list[tuple[int, int]]  # (left id, right id), new id = first_new_id + index
    strings: list[str]  # byte-level string of each new token
    first_new_id: int
    skipped_existing: int = 0
    skipped_unreachable: int = 0
    stopped_early: bool = False


def learn_merges(
    base: BaseTokenizer,
    words: WordCounts,
    n_new_tokens: int,
    *,
    selection: str = DEFAULT_SELECTION,
    morphology: bool = DEFAULT_MORPHOLOGY,
    morphology_penalty: float = DEFAULT_MORPHOLOGY_PENALTY,
    balance_total: float = DEFAULT_BALANCE_TOTAL,
    balance_exponent: float = DEFAULT_BALANCE_EXPONENT,
    min_frequency: int = 2,
    word_exponent: float = DEFAULT_WORD_EXPONENT,
    table_weight: float = DEFAULT_TABLE_WEIGHT,
    progress: bool = True,
) -> LearnedMerges:
    """Greedy continued BPE over ``words`` starting from ``base``'s segmentation (see module docstring).

    Word-count tables among the sources are rescaled first (:func:`source_factors`).
    """
    from trkit.progress import tqdm

    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if n_new_tokens < 1:
        raise ValueError(f"n_new_tokens must be >= 1, got {n_new_tokens}")
    if not 0 <= balance_exponent <= 1:
        raise ValueError(f"balance_exponent must be in [0, 1], got {balance_exponent}")
    if not 0 < word_exponent <= 1:
        raise ValueError(f"word_exponent must be in (0, 1], got {word_exponent}")
    if not 0 < morphology_penalty <= 1:
        raise ValueError(f"morphology_penalty must be in (0, 1], got {morphology_penalty}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}: a merge needs a pair seen at least once")
    if not table_weight > 0:
        raise ValueError(f"table_weight must be > 0, got {table_weight}")
    model = base.backend.model
    vocab = base.backend.get_vocab(with_added_tokens=True)
    id_to_str = {i: s for s, i in vocab.items()}
    first_new = len(base)
    balanced = selection == "balanced" and len(words.sources) > 1
    S = len(words.sources) if balanced else 1

    # 1. distinct words -> base segmentation (the Rust BPE model, word by word; cached per word)
    all_words = words.total()
    seg: dict[str, list[int]] = {w: [t.id for t in model.tokenize(w)] for w in all_words}
    boundaries = None
    if morphology:
        boundaries = stem_boundaries(all_words, {w for w in all_words if len(seg[w]) > 1})

    # 2. entries: one per (word, source) where the word has at least one junction
    seqs: list[list[int]] = []
    weights: list[list[float]] = []
    src_of: list[int] = []
    factors = source_factors(words, table_weight)
    for s_index, counter in enumerate(words.counts):
        s = s_index if balanced else 0
        factor = factors[s_index]
        for w, f in counter.items():
            if factor != 1:
                f = f * factor
            if word_exponent != 1:
                f = f**word_exponent
            ids = seg[w]
            if len(ids) < 2:
                continue
            if boundaries is not None and w in boundaries:
                cut = boundaries[w]
                jw, off = [], 0
                for t in ids[:-1]:
                    off += len(id_to_str[t])
                    jw.append(f * morphology_penalty if off == cut else float(f))
            else:
                jw = [float(f)] * (len(ids) - 1)
            seqs.append(list(ids))
            weights.append(jw)
            src_of.append(s)

    counts: dict[int, list[float]] = {}
    where: dict[int, set[int]] = collections.defaultdict(set)
    for e, (ids, jw) in enumerate(zip(seqs, weights)):
        s = src_of[e]
        for i in range(len(ids) - 1):
            k = ids[i] * _KEY + ids[i + 1]
            c = counts.get(k)
            if c is None:
                c = counts[k] = [0.0] * S
            c[s] += jw[i]
            where[k].add(e)

    if balanced:
        totals = [0.0] * S
        for c in counts.values():
            for s in range(S):
                totals[s] += c[s]
        mean_total = sum(totals) / S
        scale = [balance_total / mean_total * (mean_total / t) ** balance_exponent if t > 0 else 0.0 for t in totals]
        log1p = math.log1p

        def score(c: list[float]) -> float:
            total = 0.0
            for k, x in zip(scale, c):
                if x > 0:
                    total += log1p(k * x)
            return total

    else:

        def score(c: list[float]) -> float:
            return c[0]

    # a pair found in one word type needs that word min_frequency times: threshold on the damped scale
    threshold = min_frequency**word_exponent - 1e-9

    def eligible(c: list[float]) -> bool:
        return sum(c) >= threshold

    heap = [(-score(c), k) for k, c in counts.items() if eligible(c)]
    heapq.heapify(heap)

    ranks: dict[int, tuple[int, int]] = {}
    merges: list[tuple[int, int]] = []
    strings: list[str] = []
    known = set(vocab)
    skipped_existing = skipped_unreachable = 0
    bar = tqdm(total=n_new_tokens, desc="learning merges", unit="merge", disable=not progress, mininterval=0.5)
    while len(merges) < n_new_tokens and heap:
        neg, k = heapq.heappop(heap)
        c = counts.get(k)
        if c is None or not eligible(c):
            continue
        sc = score(c)
        if sc < -neg - 1e-9:  # stale: the live count is lower, push back with the true score
            heapq.heappush(heap, (-sc, k))
            continue
        a, b = divmod(k, _KEY)
        new_str = id_to_str[a] + id_to_str[b]
        if new_str in known:  # would duplicate an existing token: never merge this pair
            skipped_existing += 1
            continue
        new_id = first_new + len(merges)
        # reachability: the token's own string must encode to it (base model, then merges so far)
        ranks[k] = (len(merges), new_id)
        if _apply_merges([t.id for t in model.tokenize(new_str)], ranks) != [new_id]:
            del ranks[k]
            skipped_unreachable += 1
            continue
        merges.append((a, b))
        strings.append(new_str)
        id_to_str[new_id] = new_str
        known.add(new_str)
        del counts[k]
        touched: set[int] = set()
        for e in where.pop(k, ()):
            ids, jw, s = seqs[e], weights[e], src_of[e]
            i, n = 0, len(ids) - 1
            while i < n:
                if ids[i] == a and ids[i + 1] == b:
                    if i > 0:
                        p, w = ids[i - 1], jw[i - 1]
                        co = counts.get(p * _KEY + a)  # None when it is the merged pair itself (a a a)
                        if co is not None:
                            co[s] -= w
                        kn = p * _KEY + new_id
                        cn = counts.get(kn)
                        if cn is None:
                            cn = counts[kn] = [0.0] * S
                        cn[s] += w
                        where[kn].add(e)
                        touched.add(kn)
                    if i + 1 < n:
                        q, w = ids[i + 2], jw[i + 1]
                        co = counts.get(b * _KEY + q)
                        if co is not None:
                            co[s] -= w
                        kn = new_id * _KEY + q
                        cn = counts.get(kn)
                        if cn is None:
                            cn = counts[kn] = [0.0] * S
                        cn[s] += w
                        where[kn].add(e)
                        touched.add(kn)
                    ids[i] = new_id
                    del ids[i + 1]
                    del jw[i]
                    n -= 1
                i += 1
        for kn in touched:
            cn = counts.get(kn)
            if cn is not None and eligible(cn):
                heapq.heappush(heap, (-score(cn), kn))
        if len(merges) % 200 == 0:
            bar.update(200)
    bar.update(len(merges) - bar.n)
    bar.close()
    stopped = len(merges) < n_new_tokens
    return LearnedMerges(merges, strings, first_new, skipped_existing, skipped_unreachable, stopped)


def source_factors(words: WordCounts, table_weight: float = DEFAULT_TABLE_WEIGHT) -> list[float]:
    """Multiplier of each source's counts: 1 for running text; a word-count table is rescaled to
    ``table_weight`` times the mean word total of the running-text sources (left as it is when there is
    no running text)."""
    totals = [sum(c.values()) for c in words.counts]
    text = [t for t, k in zip(totals, words.kinds) if k == "text" and t > 0]
    if not text:
        return [1.0] * len(totals)
    target = table_weight * sum(text) / len(text)
    return [target / t if k != "text" and t > 0 else 1.0 for t, k in zip(totals, words.kinds)]


# --------------------------------------------------------------------------------------------
# Candidate tokens from an existing vocabulary (SentencePiece model / vocab, or a token list)
# --------------------------------------------------------------------------------------------


def read_candidates(path: str | os.PathLike) -> list[str]:
    """Candidate token texts: the pieces of a SentencePiece ``.model`` (control, unknown and byte pieces
    left out) or ``.vocab`` (``piece<TAB>score`` lines), or any other text file with one token per line
    (spaces are part of the token). SentencePiece's word-start mark U+2581 becomes a space."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such candidates file (a SentencePiece .model/.vocab or one token per line)")
    pieces: list[str] = []
    if path.suffix == ".model":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises OSError / RuntimeError on a bad file
            raise ValueError(f"{path}: not a SentencePiece model ({exc}); pass a .model written by "
                             "sentencepiece, its .vocab, or a text file with one token per line") from None
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    else:
        for lineno, line in _read_lines(path, DEFAULT_MAX_LINE_BYTES, collections.Counter(), strict=True):
            if path.suffix == ".vocab":
                piece, tab, _ = line.partition("\t")
                if not tab:
                    raise ValueError(f"{path}:{lineno}: expected 'piece<TAB>score' (a SentencePiece .vocab), got "
                                     f"{line[:80]!r}")
                line = piece
            if line:
                pieces.append(line)
    out = list(dict.fromkeys(p.replace("\u2581", " ") for p in pieces))
    if not out:
        raise ValueError(f"{path}: holds no candidate tokens")
    return out


@dataclass
class CandidateMerges(LearnedMerges):
    candidates: dict[str, int] = field(default_factory=dict)  # what happened to the candidates, by outcome


def candidate_merges(
    base: BaseTokenizer,
    words: WordCounts,
    candidates: Iterable[str],
    n_new_tokens: int,
    *,
    min_frequency: int = 2,
    table_weight: float = DEFAULT_TABLE_WEIGHT,
    progress: bool = True,
) -> CandidateMerges:
    """Turn candidate tokens into appended merges on ``base``'s byte-level tokens.

    A candidate is kept if the base pre-tokeniser leaves it in one piece (no merge can cross a
    pre-token boundary) and it is not in the vocabulary yet. Its *corpus frequency* is how often its
    base segmentation occurs inside the segmentations of the corpus's words (weighted by the words'
    counts, tables rescaled as in ``learn_merges``). In that order, most frequent first, each candidate
    gets the merges that build it from its current segmentation (base merges plus the merges appended so
    far): at each step the adjacent pair whose concatenation is most frequent in the corpus, unless its
    string already exists or would not encode to itself, until the candidate is one token. A candidate
    that cannot be built, or whose merges would pass ``n_new_tokens``, is rolled back and skipped.
    Every merge is appended, so ids, coarsening, round trips and reachability hold as for learned merges.
    """
    from trkit.progress import tqdm

    if n_new_tokens < 1:
        raise ValueError(f"n_new_tokens must be >= 1, got {n_new_tokens}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    model, normalizer, pre = base.backend.model, base.backend.normalizer, base.backend.pre_tokenizer
    vocab = base.backend.get_vocab(with_added_tokens=True)
    id_to_str = {i: s for s, i in vocab.items()}
    first_new = len(base)
    outcome: collections.Counter = collections.Counter()

    # 1. candidates -> base segmentations (one pre-token each, not in the vocabulary)
    segs: dict[tuple[int, ...], str] = {}
    for text in candidates:
        outcome["read"] += 1
        pieces = pre.pre_tokenize_str(normalizer.normalize_str(text) if normalizer is not None else text)
        if len(pieces) != 1:
            outcome["crosses_pretokenizer"] += 1
            continue
        s = pieces[0][0]
        if s in vocab:
            outcome["already_in_vocabulary"] += 1
            continue
        seg = tuple(t.id for t in model.tokenize(s))
        if seg in segs:
            outcome["duplicate"] += 1
            continue
        segs[seg] = s
    # 2. corpus frequency of every candidate and of every contiguous part of one (possible intermediates)
    needed: set[tuple[int, ...]] = set()
    for seg in segs:
        for i in range(len(seg) - 1):
            for j in range(i + 2, len(seg) + 1):
                needed.add(seg[i:j])
    starts = {t[:2] for t in needed}
    longest = max((len(t) for t in needed), default=2)
    freq: collections.Counter = collections.Counter()
    factors = source_factors(words, table_weight)
    weight: collections.Counter = collections.Counter()
    for counter, k in zip(words.counts, factors):
        for w, f in counter.items():
            weight[w] += f * k
    for w, f in weight.items():
        ids = tuple(t.id for t in model.tokenize(w))
        for i in range(len(ids) - 1):
            if ids[i : i + 2] not in starts:
                continue
            for j in range(i + 2, min(len(ids), i + longest) + 1):
                part = ids[i:j]
                if part in needed:
                    freq[part] += f
    ranked = sorted(segs, key=lambda seg: -freq[seg])  # stable: file order among equal frequencies

    # 3. build each candidate from its current segmentation, most frequent first
    ranks: dict[int, tuple[int, int]] = {}
    merges: list[tuple[int, int]] = []
    strings: list[str] = []
    parts: dict[int, tuple[int, ...]] = {}  # new id -> its base ids
    known = set(vocab)
    bar = tqdm(total=n_new_tokens, desc="candidate merges", unit="merge", disable=not progress, mininterval=0.5)
    for seg in ranked:
        if len(merges) >= n_new_tokens:
            outcome["over_budget"] += 1
            continue
        if freq[seg] < min_frequency:
            outcome["below_min_frequency"] += 1
            continue
        target = segs[seg]
        if target in known:  # built meanwhile, as a part of a longer candidate
            outcome["built_as_part"] += 1
            continue
        start = len(merges)
        cur = _apply_merges(list(seg), ranks)
        while len(cur) > 1:
            options = sorted(range(len(cur) - 1), key=lambda i: -freq[parts.get(cur[i], (cur[i],))
                                                                      + parts.get(cur[i + 1], (cur[i + 1],))])
            for i in options:
                a, b = cur[i], cur[i + 1]
                s = id_to_str[a] + id_to_str[b]
                if s in known:
                    continue
                new_id = first_new + len(merges)
                k = a * _KEY + b
                ranks[k] = (len(merges), new_id)
                if _apply_merges([t.id for t in model.tokenize(s)], ranks) != [new_id]:
                    del ranks[k]
                    continue
                merges.append((a, b))
                strings.append(s)
                id_to_str[new_id] = s
                known.add(s)
                parts[new_id] = parts.get(a, (a,)) + parts.get(b, (b,))
                break
            else:  # no pair can be merged: roll this candidate back
                cur = None
                break
            cur = _apply_merges(list(seg), ranks)
        if cur is None or len(merges) > n_new_tokens:
            outcome["unreachable" if cur is None else "over_budget"] += 1
            for j in range(len(merges) - 1, start - 1, -1):
                a, b = merges.pop()
                del ranks[a * _KEY + b]
                known.discard(strings.pop())
                parts.pop(first_new + j, None)
                id_to_str.pop(first_new + j, None)
            continue
        outcome["used"] += 1
        outcome["intermediate_tokens"] += len(merges) - start - 1
        bar.update(len(merges) - start)
    bar.close()
    stopped = len(merges) < n_new_tokens
    return CandidateMerges(merges, strings, first_new, outcome["already_in_vocabulary"], outcome["unreachable"],
                           stopped, dict(outcome))


# --------------------------------------------------------------------------------------------
# Save / inspect an extension
# --------------------------------------------------------------------------------------------


def extended_tokenizer_json(base: BaseTokenizer, learned: LearnedMerges) -> dict:
    """The base tokenizer.json with the added tokens pinned in the BPE vocab and the merges appended."""
    tj = dict(base.tokenizer_json)  # copies of the parts we change; the rest is shared, read-only
    model = tj["model"] = dict(tj["model"])
    vocab: dict[str, int] = dict(model["vocab"])
    model["vocab"] = vocab
    model["merges"] = list(model["merges"])
    used_ids = set(vocab.values())
    for t in tj.get("added_tokens", []):
        # transformers 5 rebuilds the BPE from vocab+merges and re-adds special tokens: absent from the
        # vocab they would be renumbered after the new tokens (<|im_end|> 151645 -> 171645)
        if t["content"] not in vocab and t["id"] not in used_ids:
            vocab[t["content"]] = t["id"]
            used_ids.add(t["id"])
    id_to_str = {i: s for s, i in vocab.items()}
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for j, ((a, b), s) in enumerate(zip(learned.merges, learned.strings)):
        new_id = learned.first_new_id + j
        left, right = id_to_str[a], id_to_str[b]
        vocab[s] = new_id
        id_to_str[new_id] = s
        model["merges"].append(f"{left} {right}" if string_merges else [left, right])
    return tj


@dataclass
class VocabExtension:
    """What ``extend_tokenizer`` produced."""

    out_dir: Path | None
    base_vocab_size: int
    n_new_tokens: int
    requested: int
    new_tokens: list[dict]
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # input lines skipped while reading, by reason

    def load(self):
        from transformers import AutoTokenizer

        if self.out_dir is None:
            raise ValueError("this extension was not saved (out_dir=None)")
        return AutoTokenizer.from_pretrained(self.out_dir)


def extend_tokenizer(
    base: Any,
    texts_or_files: Any,
    n_new_tokens: int = 20000,
    out_dir: str | os.PathLike | None = None,
    *,
    selection: str = DEFAULT_SELECTION,
    morphology: bool = DEFAULT_MORPHOLOGY,
    morphology_penalty: float = DEFAULT_MORPHOLOGY_PENALTY,
    balance_total: float = DEFAULT_BALANCE_TOTAL,
    balance_exponent: float = DEFAULT_BALANCE_EXPONENT,
    word_exponent: float = DEFAULT_WORD_EXPONENT,
    min_frequency: int = 2,
    table_weight: float = DEFAULT_TABLE_WEIGHT,
    table_casing: str = DEFAULT_TABLE_CASING,
    max_table_words: int | None = DEFAULT_MAX_TABLE_WORDS,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    candidates: str | os.PathLike | None = None,
    allow_fewer: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> VocabExtension:
    """Learn ``n_new_tokens`` Turkish merges on top of ``base`` and save a tokenizer directory.

    ``base``: 'qwen3' / 'smollm2' (offline), a directory, a hub name, or a loaded fast tokenizer.
    ``texts_or_files``: see ``corpus_sources``. With ``candidates`` (a SentencePiece .model/.vocab or a
    token list) the new tokens are those candidates (:func:`candidate_merges`) instead of learned merges.
    Fewer new tokens than asked is an error unless ``allow_fewer`` (then a RuntimeWarning); none at all
    is always an error. ``out_dir`` is checked before any work (trkit.options.check_output: not an input,
    not inside one, an existing one only with ``overwrite`` and only if trkit wrote it).
    The directory loads with plain ``AutoTokenizer.from_pretrained(out_dir)``; ``trkit_manifest.json``
    records the base tokenizer's sha256 and fingerprint, the corpus sha256 and sources (lines dropped
    while reading included), the parameters and every new token with its parents.
    """
    from trkit.artifacts import atomic_directory, atomic_write_text, sha256_file, write_manifest
    from trkit.options import check_output

    t0 = time.perf_counter()
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    for label, value, ok in (("n_new_tokens", n_new_tokens, n_new_tokens >= 1), ("min_frequency", min_frequency, min_frequency >= 1),
                             ("max_line_bytes", max_line_bytes, max_line_bytes >= 1),
                             ("max_table_words", max_table_words, max_table_words is None or max_table_words >= 1),
                             ("table_weight", table_weight, table_weight > 0),
                             ("balance_exponent", balance_exponent, 0 <= balance_exponent <= 1),
                             ("word_exponent", word_exponent, 0 < word_exponent <= 1),
                             ("morphology_penalty", morphology_penalty, 0 < morphology_penalty <= 1)):
        if not ok:
            raise ValueError(f"{label} = {value} is out of range (see help(trkit.vocab.extend_tokenizer))")
    if table_casing not in TABLE_CASINGS:
        raise ValueError(f"table_casing must be one of {TABLE_CASINGS}, got {table_casing!r}")
    inputs = _input_paths(texts_or_files) + [os.fspath(x) for x in (base, candidates) if isinstance(x, (str, os.PathLike))]
    if out_dir is not None:
        check_output(out_dir, inputs=inputs, overwrite=overwrite)
    b = load_base(base)
    candidate_texts = read_candidates(candidates) if candidates is not None else None
    t1 = time.perf_counter()
    words = count_words(b, texts_or_files, progress=progress, max_line_bytes=max_line_bytes,
                        max_table_words=max_table_words, table_casing=table_casing, workers=workers)
    t2 = time.perf_counter()
    if candidate_texts is not None:
        learned: LearnedMerges = candidate_merges(b, words, candidate_texts, n_new_tokens, min_frequency=min_frequency,
                                                  table_weight=table_weight, progress=progress)
    else:
        learned = learn_merges(b, words, n_new_tokens, selection=selection, morphology=morphology,
                               morphology_penalty=morphology_penalty, balance_total=balance_total,
                               balance_exponent=balance_exponent, word_exponent=word_exponent,
                               min_frequency=min_frequency, table_weight=table_weight, progress=progress)
    t3 = time.perf_counter()
    if len(learned.merges) < n_new_tokens:
        why = (f"no more usable candidates ({_dropped_text(learned.candidates)})" if candidate_texts is not None
               else f"the corpus has no more pairs seen at least {min_frequency} times")
        msg = f"only {len(learned.merges)} new tokens could be made (asked for {n_new_tokens}): {why}"
        if words.dropped:
            msg += f"; {sum(words.dropped.values())} input lines were dropped while reading ({_dropped_text(words.dropped)})"
        if not learned.merges:
            raise ValueError(msg + ". Use a larger corpus (or more candidates); nothing was written.")
        if not allow_fewer:
            raise ValueError(msg + ". Use a larger corpus, fewer new tokens, or allow_fewer=True (--allow-fewer) to "
                             "save what was made; nothing was written.")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    tj = extended_tokenizer_json(b, learned)
    id_to_str = {i: s for s, i in tj["model"]["vocab"].items()}
    new_tokens = [
        {"id": learned.first_new_id + j, "token": s, "left": id_to_str[a], "right": id_to_str[r]}
        for j, ((a, r), s) in enumerate(zip(learned.merges, learned.strings))
    ]
    sources = {}
    for n, kind, d, by in zip(words.sources, words.kinds, words.documents, words.bytes):
        sources[n] = ({"kind": kind, **words.tables[n]} if n in words.tables
                      else {"kind": kind, "documents": d, "bytes": by})
    parameters = dict(n_new_tokens=n_new_tokens, selection=selection, morphology=morphology,
                      morphology_penalty=morphology_penalty, balance_total=balance_total,
                      balance_exponent=balance_exponent, word_exponent=word_exponent, min_frequency=min_frequency,
                      table_weight=table_weight, table_casing=table_casing, max_table_words=max_table_words,
                      max_line_bytes=max_line_bytes, allow_fewer=allow_fewer)
    if candidates is not None:
        parameters["candidates"] = {"file": Path(candidates).name, "sha256": sha256_file(candidates)}
    learned_info = dict(n_new_tokens=len(new_tokens), stopped_early=learned.stopped_early,
                        skipped_existing=learned.skipped_existing, skipped_unreachable=learned.skipped_unreachable)
    if isinstance(learned, CandidateMerges):
        learned_info["candidates"] = learned.candidates
    fields = dict(
        base_tokenizer=b.name,
        base_tokenizer_sha256=b.sha256,
        base_fingerprint=tokenizer_fingerprint(b.tokenizer_json),
        base_vocab_size=len(b),
        extended_vocab_size=len(b) + len(new_tokens),
        corpus_sha256=words.corpus_sha256,
        corpus_sources=sources,
        corpus_dropped=words.dropped,
        parameters=parameters,
        learned=learned_info,
        new_tokens=new_tokens,
    )
    manifest: dict = fields
    if out_dir is not None:
        with atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
            for name in TOKENIZER_FILES:
                src = b.directory / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
            atomic_write_text(tmp / "tokenizer.json", json.dumps(tj, ensure_ascii=False) + "\n")
            if (b.directory / "vocab.json").is_file():  # for tools that read the slow-tokenizer files
                atomic_write_text(tmp / "vocab.json", json.dumps(tj["model"]["vocab"], ensure_ascii=False) + "\n")
            if (b.directory / "merges.txt").is_file():
                lines = ["#version: 0.2"] + [" ".join(_merge_pair(m)) for m in tj["model"]["merges"]]
                atomic_write_text(tmp / "merges.txt", "\n".join(lines) + "\n")
            manifest = write_manifest(tmp, "vocab", **fields)
    t4 = time.perf_counter()
    seconds = dict(load_base=t1 - t0, count_words=t2 - t1, learn_merges=t3 - t2, save=t4 - t3, total=t4 - t0)
    return VocabExtension(Path(out_dir) if out_dir is not None else None, len(b), len(new_tokens), n_new_tokens,
                          new_tokens, manifest, seconds, dict(words.dropped))


def new_token_constituents(ext_dir: str | os.PathLike) -> dict[int, list[int]]:
    """Every new id -> the base-tokenizer ids it is made of (its merge tree's leaves, left to right)."""
    from trkit.artifacts import read_manifest

    manifest = read_manifest(ext_dir, verify=False)
    if manifest.get("stage") != "vocab":
        raise ValueError(f"{ext_dir} is not a trkit vocab directory (stage {manifest.get('stage')!r})")
    vocab = json.loads(Path(ext_dir, "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    base_size = manifest["base_vocab_size"]
    out: dict[int, list[int]] = {}
    for t in manifest["new_tokens"]:  # parents always precede children
        parts = []
        for side in (t["left"], t["right"]):
            i = vocab[side]
            parts.extend(out[i] if i >= base_size else [i])
        out[t["id"]] = parts
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    from trkit.options import nonnegative_int, open_unit_interval, positive_float, positive_int, unit_interval

    parser.add_argument("--base", default="qwen3", help="base tokenizer: qwen3 | smollm2 | directory | hub name")
    parser.add_argument("--corpus", nargs="+", default=["default"],
                        help="'default' (offline Turkish running text + the word-frequency tables "
                             f"{', '.join(DEFAULT_CORPUS_TABLES) or '(none)'}), 'default-text' (the running text only), "
                             "'wordfreq' / 'trnlp' (one offline table), text/JSONL/parquet files, word<TAB>count .tsv "
                             "files, or a `trkit corpus` directory")
    parser.add_argument("--new-tokens", type=positive_int, default=20000, help="number of new tokens (merges) to make")
    parser.add_argument("--out", required=True, help="output directory (AutoTokenizer.from_pretrained loads it)")
    parser.add_argument("--candidates", metavar="FILE",
                        help="make the new tokens from these candidates instead of learning merges: a SentencePiece "
                             ".model or .vocab, or a text file with one token per line (ranked by corpus frequency)")
    parser.add_argument("--selection", choices=SELECTIONS, default=DEFAULT_SELECTION,
                        help="pair score: plain frequency, or source-balanced sum of log1p counts")
    parser.add_argument("--morphology", action=argparse.BooleanOptionalAction, default=DEFAULT_MORPHOLOGY,
                        help="discourage merges across Turkish stem|suffix boundaries")
    parser.add_argument("--morphology-penalty", type=open_unit_interval, default=DEFAULT_MORPHOLOGY_PENALTY,
                        help="weight of a pair occurrence that crosses a stem|suffix boundary (0<p<=1)")
    parser.add_argument("--balance-exponent", type=unit_interval, default=DEFAULT_BALANCE_EXPONENT,
                        help="balanced selection: scale source s by (mean total / its total)**exponent "
                             "(1 = every source the same total, 0 = no rescaling)")
    parser.add_argument("--word-exponent", type=open_unit_interval, default=DEFAULT_WORD_EXPONENT,
                        help="a word seen f times counts f**exponent (1 = plain counts, 0.5 = square-root damping)")
    parser.add_argument("--min-frequency", type=positive_int, default=2, help="ignore pairs seen fewer times (>= 1)")
    parser.add_argument("--table-weight", type=positive_float, default=DEFAULT_TABLE_WEIGHT,
                        help="a word-count table counts as this many typical running-text sources")
    parser.add_argument("--table-casing", choices=TABLE_CASINGS, default=DEFAULT_TABLE_CASING,
                        help="word-count tables: 'lower' = as listed; 'text' = move a share of each word's count to "
                             "its capitalised form, as often as the running text capitalises it")
    parser.add_argument("--max-table-words", type=positive_int, default=DEFAULT_MAX_TABLE_WORDS,
                        help="keep only this many most frequent words of each word-count table (bounds memory)")
    parser.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        help="skip (and count) input lines longer than this (bounds memory)")
    parser.add_argument("--workers", type=nonnegative_int, default=0,
                        help="processes for counting words (0 = auto: one per core, at most 4, for inputs >= 64 MB)")
    parser.add_argument("--allow-fewer", action="store_true",
                        help="save the extension even when fewer new tokens than --new-tokens could be made")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory written by trkit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args) -> int:
    corpus: Any = list(args.corpus)
    missing = [c for c in corpus if c not in SOURCE_NAMES and not Path(c).exists()]
    if missing:
        raise FileNotFoundError(f"corpus path(s) not found: {', '.join(missing)}; pass existing files, 'default', "
                                f"'default-text', or a table name ({', '.join(WORD_TABLES)})")
    if args.candidates is not None and not Path(args.candidates).is_file():
        raise FileNotFoundError(f"--candidates {args.candidates}: no such file")
    corpus = corpus[0] if len(corpus) == 1 else [c if c in SOURCE_NAMES else Path(c) for c in corpus]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = extend_tokenizer(args.base, corpus, args.new_tokens, args.out, selection=args.selection,
                                  morphology=args.morphology, morphology_penalty=args.morphology_penalty,
                                  balance_exponent=args.balance_exponent, word_exponent=args.word_exponent,
                                  min_frequency=args.min_frequency, table_weight=args.table_weight,
                                  table_casing=args.table_casing, max_table_words=args.max_table_words,
                                  max_line_bytes=args.max_line_bytes, candidates=args.candidates,
                                  allow_fewer=args.allow_fewer, workers=args.workers or None,
                                  overwrite=args.overwrite, progress=not args.quiet)
    for w in caught:
        print(f"warning: {w.message}")
    learned = result.manifest["learned"]
    dropped = (f"; dropped {sum(result.dropped.values())} input lines ({_dropped_text(result.dropped)})"
               if result.dropped else "")
    print(
        f"wrote {result.out_dir}: {result.n_new_tokens} new tokens (ids {result.base_vocab_size}.."
        f"{result.base_vocab_size + result.n_new_tokens - 1}), vocabulary {result.base_vocab_size + result.n_new_tokens}; "
        f"skipped {learned['skipped_existing']} pairs already in the vocabulary, {learned['skipped_unreachable']} "
        f"unreachable{dropped}; {result.seconds['total']:.1f} s"
    )
    return 0


def readable_token(token: str) -> str:
    """A byte-level token as a person reads it: its UTF-8 text, with every byte that is not part of a
    complete character shown as ``<0xNN>`` (a token can hold half of ``ç``: ``' ç'`` = ``' <0xC3>'`` +
    ``'<0xA7>'``), never as the replacement character the decoder would print."""
    data = byte_level_to_text(token) if all(c in byte_decoder() for c in token) else token.encode("utf-8")
    out, i = [], 0
    while i < len(data):
        for width in (1, 2, 3, 4):  # the shortest complete character starting here
            try:
                out.append(data[i : i + width].decode("utf-8"))
                i += width
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{data[i]:02X}>")
            i += 1
    return "".join(out)


def segmentation(tokenizer, text: str) -> list[str]:
    """``text`` as the tokenizer splits it, each piece readable (:func:`readable_token`)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [readable_token(t) for t in tokenizer.convert_ids_to_tokens(ids)]
