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
import shutil
import tempfile
import time
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


def _iter_file_docs(path: Path) -> Iterator[str]:
    """Documents of a file: one per line (.txt), the "text" field (.jsonl/.json lines), parquet "text"."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if suffix in (".jsonl", ".json"):
                line = line.strip()
                if not line:
                    continue
                try:
                    line = json.loads(line).get("text") or ""
                except (json.JSONDecodeError, AttributeError):
                    continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # invalid UTF-8 in the file: skip the line
                continue
            line = line.rstrip("\n")
            if line.strip():
                yield line


def _load_corpus_dir(path: Path) -> dict[str, list[str]]:
    """A directory written by ``trkit corpus``: its train split, grouped by the ``source`` column."""
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    train = ds["train"] if hasattr(ds, "keys") and "train" in ds else ds
    groups: dict[str, list[str]] = collections.defaultdict(list)
    sources = train["source"] if "source" in train.column_names else ["corpus"] * len(train)
    for text, src in zip(train["text"], sources):
        groups[src].append(text)
    return dict(groups)


def corpus_sources(texts_or_files: Any) -> dict[str, Iterable[str] | Path]:
    """Normalise the many accepted corpus forms to ``{source name: path or iterable of documents}``.

    Accepted: ``"default"`` (the offline corpus, one source per file), a path (file, or a directory
    written by ``trkit corpus``), a list of paths (one source per file), a list of strings (texts, one
    source), or a mapping ``{source: any of these}``.
    """
    if isinstance(texts_or_files, Mapping):
        out: dict[str, Any] = {}
        for k, v in texts_or_files.items():
            sub = corpus_sources(v)
            if len(sub) == 1:
                out[str(k)] = next(iter(sub.values()))
            else:
                out.update({f"{k}/{kk}": vv for kk, vv in sub.items()})
        return out
    if isinstance(texts_or_files, str) and texts_or_files == "default":
        from trkit.assets import corpus_files

        return {k: Path(v) for k, v in corpus_files().items()}
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    items = list(texts_or_files)
    for x in items:
        if isinstance(x, str) and not os.path.exists(x) and not any(c.isspace() for c in x) \
                and x.lower().endswith((".txt", ".jsonl", ".json", ".parquet")):
            raise FileNotFoundError(f"{x}: no such file (pass existing corpus files, 'default', or texts)")
    if not items:
        raise ValueError("the corpus is empty: pass 'default', file paths, or a list of Turkish texts")
    paths = [x for x in items if isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x and len(x) < 4096
                                                                  and os.path.exists(x))]
    if len(paths) == len(items):
        out = {}
        for p in map(Path, paths):
            if p.is_dir():
                if not (p / "dataset_dict.json").exists() and not (p / "dataset_info.json").exists():
                    raise ValueError(f"{p} is a directory but not a dataset written by `trkit corpus`")
                out.update(_load_corpus_dir(p))
            else:
                key = p.stem if p.stem not in out else str(p)
                out[key] = p
        return out
    if paths:
        raise ValueError("mix of file paths and texts: pass either paths or texts (or a dict {source: ...})")
    return {"texts": items}


@dataclass
class WordCounts:
    """Distinct pre-tokenised words (byte-level strings) with their count in each source."""

    sources: list[str]
    counts: list[collections.Counter]  # one Counter per source: word -> count
    corpus_sha256: str
    documents: list[int]
    bytes: list[int]

    def total(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for x in self.counts:
            c.update(x)
        return c


def count_words(base: BaseTokenizer, texts_or_files: Any, progress: bool = True) -> WordCounts:
    """Normalise and pre-tokenise every document exactly as ``base`` does, counting words per source."""
    from tqdm.auto import tqdm

    sources = corpus_sources(texts_or_files)
    normalizer, pre = base.backend.normalizer, base.backend.pre_tokenizer
    h = hashlib.sha256()
    names, counters, ndocs, nbytes = [], [], [], []
    bar = tqdm(total=len(sources), desc="counting words", unit="source", disable=not progress)
    for name in sorted(sources):
        src = sources[name]
        docs = _iter_file_docs(src) if isinstance(src, Path) else iter(src)
        c: collections.Counter = collections.Counter()
        h.update(f"\x00source\x00{name}\x00".encode("utf-8"))
        n = b = 0
        for doc in docs:
            if not isinstance(doc, str):
                raise ValueError(f"source {name!r} yielded a {type(doc).__name__}, expected str documents")
            raw = doc.encode("utf-8", errors="surrogatepass")
            h.update(raw + b"\n")
            n += 1
            b += len(raw)
            if normalizer is not None:
                doc = normalizer.normalize_str(doc)
            c.update([w for w, _ in pre.pre_tokenize_str(doc)])
        names.append(name)
        counters.append(c)
        ndocs.append(n)
        nbytes.append(b)
        bar.update(1)
    bar.close()
    if not any(counters):
        raise ValueError("the corpus is empty (no non-blank documents were read): check the paths / texts you passed")
    return WordCounts(names, counters, h.hexdigest(), ndocs, nbytes)


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
    progress: bool = True,
) -> LearnedMerges:
    """Greedy continued BPE over ``words`` starting from ``base``'s segmentation (see module docstring)."""
    from tqdm.auto import tqdm

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
    for s_index, counter in enumerate(words.counts):
        s = s_index if balanced else 0
        for w, f in counter.items():
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
    if stopped:
        warnings.warn(
            f"only {len(merges)} new tokens could be learned (asked for {n_new_tokens}): the corpus has no more "
            f"pairs seen at least {min_frequency} times. Use a larger corpus or fewer new tokens.",
            RuntimeWarning,
            stacklevel=2,
        )
    return LearnedMerges(merges, strings, first_new, skipped_existing, skipped_unreachable, stopped)


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
    overwrite: bool = False,
    progress: bool = True,
) -> VocabExtension:
    """Learn ``n_new_tokens`` Turkish merges on top of ``base`` and save a tokenizer directory.

    ``base``: 'qwen3' / 'smollm2' (offline), a directory, a hub name, or a loaded fast tokenizer.
    ``texts_or_files``: see ``corpus_sources``. The directory loads with plain
    ``AutoTokenizer.from_pretrained(out_dir)``; ``trkit_manifest.json`` records the base tokenizer's
    sha256 and fingerprint, the corpus sha256, the parameters and every new token with its parents.
    """
    from trkit.artifacts import atomic_directory, atomic_write_text, write_manifest

    t0 = time.perf_counter()
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass overwrite=True "
                              "(--overwrite) to replace it")
    b = load_base(base)
    t1 = time.perf_counter()
    words = count_words(b, texts_or_files, progress=progress)
    t2 = time.perf_counter()
    learned = learn_merges(b, words, n_new_tokens, selection=selection, morphology=morphology,
                           morphology_penalty=morphology_penalty, balance_total=balance_total,
                           balance_exponent=balance_exponent, word_exponent=word_exponent,
                           min_frequency=min_frequency, progress=progress)
    t3 = time.perf_counter()
    tj = extended_tokenizer_json(b, learned)
    id_to_str = {i: s for s, i in tj["model"]["vocab"].items()}
    new_tokens = [
        {"id": learned.first_new_id + j, "token": s, "left": id_to_str[a], "right": id_to_str[r]}
        for j, ((a, r), s) in enumerate(zip(learned.merges, learned.strings))
    ]
    fields = dict(
        base_tokenizer=b.name,
        base_tokenizer_sha256=b.sha256,
        base_fingerprint=tokenizer_fingerprint(b.tokenizer_json),
        base_vocab_size=len(b),
        extended_vocab_size=len(b) + len(new_tokens),
        corpus_sha256=words.corpus_sha256,
        corpus_sources={n: {"documents": d, "bytes": by} for n, d, by in zip(words.sources, words.documents, words.bytes)},
        parameters=dict(n_new_tokens=n_new_tokens, selection=selection, morphology=morphology,
                        morphology_penalty=morphology_penalty, balance_total=balance_total,
                        balance_exponent=balance_exponent, word_exponent=word_exponent,
                        min_frequency=min_frequency),
        learned=dict(n_new_tokens=len(new_tokens), stopped_early=learned.stopped_early,
                     skipped_existing=learned.skipped_existing, skipped_unreachable=learned.skipped_unreachable),
        new_tokens=new_tokens,
    )
    manifest: dict = fields
    if out_dir is not None:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
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
                          new_tokens, manifest, seconds)


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
    parser.add_argument("--base", default="qwen3", help="base tokenizer: qwen3 | smollm2 | directory | hub name")
    parser.add_argument("--corpus", nargs="+", default=["default"],
                        help="'default' (offline Turkish corpus), text/JSONL/parquet files, or a `trkit corpus` directory")
    parser.add_argument("--new-tokens", type=int, default=20000, help="number of new tokens (merges) to learn")
    parser.add_argument("--out", required=True, help="output directory (AutoTokenizer.from_pretrained loads it)")
    parser.add_argument("--selection", choices=SELECTIONS, default=DEFAULT_SELECTION,
                        help="pair score: plain frequency, or source-balanced sum of log1p counts")
    parser.add_argument("--morphology", action=argparse.BooleanOptionalAction, default=DEFAULT_MORPHOLOGY,
                        help="discourage merges across Turkish stem|suffix boundaries")
    parser.add_argument("--morphology-penalty", type=float, default=DEFAULT_MORPHOLOGY_PENALTY,
                        help="weight of a pair occurrence that crosses a stem|suffix boundary (0<p<=1)")
    parser.add_argument("--balance-exponent", type=float, default=DEFAULT_BALANCE_EXPONENT,
                        help="balanced selection: scale source s by (mean total / its total)**exponent "
                             "(1 = every source the same total, 0 = no rescaling)")
    parser.add_argument("--word-exponent", type=float, default=DEFAULT_WORD_EXPONENT,
                        help="a word seen f times counts f**exponent (1 = plain counts, 0.5 = square-root damping)")
    parser.add_argument("--min-frequency", type=int, default=2, help="ignore pairs seen fewer times")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args) -> int:
    corpus: Any = args.corpus
    if corpus == ["default"]:
        corpus = "default"
    else:
        missing = [c for c in corpus if not Path(c).exists()]
        if missing:
            raise FileNotFoundError(f"corpus path(s) not found: {', '.join(missing)}; pass existing files or 'default'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = extend_tokenizer(args.base, corpus, args.new_tokens, args.out, selection=args.selection,
                                  morphology=args.morphology, morphology_penalty=args.morphology_penalty,
                                  balance_exponent=args.balance_exponent, word_exponent=args.word_exponent,
                                  min_frequency=args.min_frequency, overwrite=args.overwrite, progress=not args.quiet)
    for w in caught:
        print(f"warning: {w.message}")
    learned = result.manifest["learned"]
    print(
        f"wrote {result.out_dir}: {result.n_new_tokens} new tokens (ids {result.base_vocab_size}.."
        f"{result.base_vocab_size + result.n_new_tokens - 1}), vocabulary {result.base_vocab_size + result.n_new_tokens}; "
        f"skipped {learned['skipped_existing']} pairs already in the vocabulary, {learned['skipped_unreachable']} "
        f"unreachable; {result.seconds['total']:.1f} s"
    )
    return 0
