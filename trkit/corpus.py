"""Turkish corpus preparation: normalise, filter, deduplicate, split, check contamination, save.

Pipeline, one document at a time (memory stays flat except the dedup indexes):

1. **read**: local text (one document per line), JSONL/JSON lines (a text field), parquet, a hub dataset
   (``datasets`` streaming, with a document limit) or the offline default corpus. Lines are read as
   bytes with a length cap, so invalid UTF-8, NUL bytes, empty files and enormous lines are counted and
   dropped instead of crashing the run or filling memory.
2. **normalise**: mojibake repair where a cheap check fires, NFC, whitespace collapsed
   (``trkit.turkish.normalize``).
3. **filter**: length bounds (characters), Turkish score (``trkit.turkish.turkish_score``), control-
   character ratio, junk ratio (characters that are neither letters, digits, spaces nor ordinary
   punctuation: markup, tables, encoded blobs).
4. **exact dedup**: 8-byte BLAKE2b of the Turkish-casefolded text.
5. **near-duplicate removal**: MinHash (Broder 1997) over word 3-gram shingles with locality-sensitive
   hashing (``datasketch.MinHashLSH``); a document whose estimated Jaccard similarity to a kept one is
   at least ``near_dup_threshold`` is dropped (as in Lee et al. 2022, "Deduplicating Training Data
   Makes Language Models Better").
6. **split** by hash of the normalised text (deterministic, independent of order and of the other
   documents): ``validation_percent`` / ``test_percent`` / rest train.
7. **contamination**: validation/test documents that share a word ``contamination_ngram``-gram with any
   train document are removed (the long n-gram overlap test of Brown et al. 2020, GPT-3 appendix C).
8. **save**: a ``datasets.DatasetDict`` (train/validation/test; columns text, source, id) written with
   ``save_to_disk`` plus ``trkit_manifest.json`` with counts kept and dropped per reason and source,
   parameters and hashes of the inputs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trkit import turkish

# ordinary characters: letters, digits, whitespace, common punctuation (incl. Turkish quotes/dashes)
_ORDINARY = re.compile(r"[\w\s.,;:!?'\"()\[\]\-–—…’‘“”«»%/&+*°§]", re.UNICODE)
_WORDS = re.compile(r"\w+", re.UNICODE)


@dataclass
class CorpusConfig:
    """Filter, dedup and split parameters (defaults suit sentence- to article-length Turkish text)."""

    min_chars: int = 20
    max_chars: int = 200_000
    max_line_bytes: int = 4_000_000  # longer lines are skipped while reading, never held in memory
    min_turkish_score: float = 0.2
    max_control_ratio: float = 0.0
    max_junk_ratio: float = 0.2
    near_dup_threshold: float = 0.8
    num_perm: int = 64
    shingle_words: int = 3
    validation_percent: float = 3.0
    test_percent: float = 3.0
    contamination_ngram: int = 10
    fix_mojibake: bool = True

    def __post_init__(self):
        if not 0 <= self.validation_percent + self.test_percent < 100:
            raise ValueError("validation_percent + test_percent must be in [0, 100)")
        if not 0 < self.near_dup_threshold <= 1:
            raise ValueError("near_dup_threshold must be in (0, 1]")
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise ValueError("need 1 <= min_chars <= max_chars")


# --------------------------------------------------------------------------------------------
# Reading (bounded memory, never crashes on bad bytes)
# --------------------------------------------------------------------------------------------


def _read_lines(path: Path, max_bytes: int, dropped: collections.Counter) -> Iterator[str]:
    """Lines of a file as str; over-long lines, invalid UTF-8 and NUL bytes are counted and skipped."""
    with open(path, "rb") as f:
        while True:
            line = f.readline(max_bytes + 1)
            if not line:
                return
            if len(line) > max_bytes and not line.endswith(b"\n"):
                dropped["too_long_line"] += 1
                while True:  # discard the rest of the line in bounded chunks
                    rest = f.readline(max_bytes)
                    if not rest or rest.endswith(b"\n"):
                        break
                continue
            if b"\x00" in line:
                dropped["nul_bytes"] += 1
                continue
            try:
                yield line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                dropped["invalid_utf8"] += 1


def iter_file(path: str | os.PathLike, config: CorpusConfig, dropped: collections.Counter,
              text_field: str = "text") -> Iterator[str]:
    """Documents of one local file (.txt: one per line; .jsonl/.json: ``text_field``; .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass text/JSONL/parquet files, a hub dataset or 'default'")
    if path.stat().st_size == 0:
        dropped["empty_file"] += 1
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_field!r}; pass --text-field with one of {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if isinstance(t, str):
                    yield t
                else:
                    dropped["not_text"] += 1
        return
    for line in _read_lines(path, config.max_line_bytes, dropped):
        if suffix in (".jsonl", ".json"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                dropped["bad_json"] += 1
                continue
            t = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(t, str):
                dropped["not_text"] += 1
                continue
            yield t
        else:
            yield line


def iter_hub(name: str, limit: int | None, config_name: str | None = None, split: str = "train",
             text_field: str = "text") -> Iterator[str]:
    """Documents of a hub dataset, streamed (nothing is downloaded beyond what is read)."""
    from datasets import load_dataset

    ds = load_dataset(name, config_name, split=split, streaming=True)
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        t = row.get(text_field)
        if isinstance(t, str):
            yield t


def resolve_inputs(inputs: Any) -> dict[str, Any]:
    """``"default"`` -> the offline corpus files; paths -> {stem: path}; a mapping is kept as is."""
    if isinstance(inputs, dict):
        return inputs
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: dict[str, Any] = {}
    for item in inputs:
        if str(item) == "default":
            from trkit.assets import corpus_files

            # only the offline corpus's training files: its validation files stay untouched, held out
            # for every later stage (our own validation/test splits are carved from the training text)
            out.update(corpus_files())
        else:
            p = Path(item)
            out[p.stem if p.stem not in out else str(p)] = p
    if not out:
        raise ValueError("no input: pass 'default', files, or a hub dataset name")
    return out


# --------------------------------------------------------------------------------------------
# Normalise, filter, dedup, split
# --------------------------------------------------------------------------------------------


def clean(text: str, config: CorpusConfig) -> str:
    """Mojibake repair (only where it looks broken), NFC, whitespace runs -> one space."""
    return " ".join(turkish.normalize(text, fix_encoding=config.fix_mojibake).split())


def junk_ratio(text: str) -> float:
    """Share of characters that are not letters, digits, spaces or ordinary punctuation."""
    return 1 - len(_ORDINARY.findall(text)) / len(text) if text else 0.0


def reject_reason(raw: str, text: str, config: CorpusConfig) -> str | None:
    """Why a document is filtered out (None = keep). ``raw`` is before, ``text`` after normalisation."""
    if not text:
        return "empty"
    if turkish.control_ratio(raw) > config.max_control_ratio:
        return "control_chars"
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if junk_ratio(text) > config.max_junk_ratio:
        return "junk"
    if turkish.turkish_score(text) < config.min_turkish_score:
        return "not_turkish"
    return None


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(turkish.casefold(text).encode("utf-8"), digest_size=8).digest()


def split_of(text: str, config: CorpusConfig) -> str:
    """Deterministic split from the sha256 of the text (same text -> same split, on any machine)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10_000 / 100
    if bucket < config.validation_percent:
        return "validation"
    if bucket < config.validation_percent + config.test_percent:
        return "test"
    return "train"


def _shingles(text: str, k: int) -> list[bytes]:
    words = _WORDS.findall(turkish.casefold(text))
    if len(words) <= k:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)]


class NearDuplicateIndex:
    """MinHash LSH over word shingles: ``seen(text)`` is True if a near-duplicate was added before."""

    def __init__(self, threshold: float, num_perm: int, shingle_words: int):
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.k, self.n = num_perm, shingle_words, 0

    def seen(self, text: str) -> bool:
        m = self._MinHash(num_perm=self.num_perm)
        m.update_batch(_shingles(text, self.k))
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self.n), m)
        self.n += 1
        return False


def _ngrams(text: str, n: int) -> set[int]:
    words = _WORDS.findall(turkish.casefold(text))
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


# --------------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusReport:
    out_dir: Path | None
    kept: dict[str, int]
    dropped: dict[str, int]
    per_source: dict[str, dict[str, int]]
    seconds: float
    manifest: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """Rows (reason, count) for a notebook table: kept per split, then dropped per reason."""
        return [{"what": f"kept: {k}", "documents": v} for k, v in self.kept.items()] + [
            {"what": f"dropped: {k}", "documents": v} for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1])]


def prepare_corpus(
    inputs: Any = "default",
    out_dir: str | os.PathLike | None = None,
    *,
    hub: str | None = None,
    hub_config: str | None = None,
    limit: int | None = None,
    text_field: str = "text",
    config: CorpusConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusReport:
    """Run the pipeline (module docstring) on local files / the default corpus, or on ``hub`` (streaming)."""
    from tqdm.auto import tqdm

    from trkit.artifacts import atomic_directory, sha256_file, write_manifest

    config = config or CorpusConfig()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another --out or pass overwrite=True (--overwrite)")
    t0 = time.perf_counter()
    dropped: collections.Counter = collections.Counter()
    per_source: dict[str, collections.Counter] = {}
    if hub:
        sources: dict[str, Any] = {hub: ("hub", hub)}
        input_hashes: dict[str, str] = {hub: f"hub:{hub}:{hub_config}:limit={limit}"}
    else:
        sources = resolve_inputs(inputs)
        input_hashes = {}
        for name, src in sources.items():
            for p in (src if isinstance(src, list) else [src]):
                if isinstance(p, (str, os.PathLike)) and Path(p).is_file():
                    input_hashes[str(p)] = sha256_file(p)
                elif isinstance(p, (str, os.PathLike)):
                    raise FileNotFoundError(f"{p}: no such file; pass text/JSONL/parquet files or 'default'")

    def documents(src, drops) -> Iterator[str]:
        if isinstance(src, tuple) and src[0] == "hub":
            yield from iter_hub(src[1], limit, hub_config, text_field=text_field)
            return
        for p in (src if isinstance(src, list) else [src]):
            if isinstance(p, (str, os.PathLike)):
                yield from iter_file(p, config, drops, text_field)
            else:
                yield p

    exact: set[bytes] = set()
    near = NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_words)
    work = Path(tempfile.mkdtemp(prefix="trkit-corpus-"))
    split_names = ("train", "validation", "test")
    files = {s: open(work / f"{s}.jsonl", "w", encoding="utf-8") for s in split_names}
    kept: collections.Counter = collections.Counter()
    bar = tqdm(desc="preparing corpus", unit="doc", disable=not progress, mininterval=0.5)
    try:
        for name, src in sources.items():
            c = per_source.setdefault(name, collections.Counter())
            drops: collections.Counter = collections.Counter()
            for raw in documents(src, drops):
                bar.update(1)
                c["read"] += 1
                text = clean(raw, config) if isinstance(raw, str) else ""
                reason = reject_reason(raw, text, config)
                if reason is None:
                    h = doc_hash(text)
                    if h in exact:
                        reason = "exact_duplicate"
                    else:
                        exact.add(h)
                        if near.seen(text):
                            reason = "near_duplicate"
                if reason is not None:
                    dropped[reason] += 1
                    c[f"dropped_{reason}"] += 1
                    continue
                split = split_of(text, config)
                files[split].write(json.dumps({"text": text, "source": name, "id": h.hex()}, ensure_ascii=False) + "\n")
                kept[split] += 1
                c[f"kept_{split}"] += 1
            for k, v in drops.items():  # problems found while reading (before a document existed)
                dropped[k] += v
                c[f"dropped_{k}"] += v
    finally:
        bar.close()
        for f in files.values():
            f.close()

    # contamination: validation/test documents sharing a long n-gram with train
    n = config.contamination_ngram
    held: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
    held_docs: dict[str, list[dict]] = {}
    for s in ("validation", "test"):
        with open(work / f"{s}.jsonl", encoding="utf-8") as f:
            held_docs[s] = [json.loads(line) for line in f]
        for i, d in enumerate(held_docs[s]):
            for g in _ngrams(d["text"], n):
                held[g].append((s, i))
    contaminated: set[tuple[str, int]] = set()
    if held:
        with open(work / "train.jsonl", encoding="utf-8") as f:
            for line in f:
                for g in _ngrams(json.loads(line)["text"], n):
                    if g in held:
                        contaminated.update(held[g])
    for s in ("validation", "test"):
        bad = [i for (ss, i) in contaminated if ss == s]
        if bad:
            keep = [d for i, d in enumerate(held_docs[s]) if (s, i) not in contaminated]
            with open(work / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for d in keep:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            for i in bad:
                per_source[held_docs[s][i]["source"]][f"dropped_contaminated_{s}"] += 1
            dropped["contaminated"] += len(bad)
            kept[s] -= len(bad)
    if sum(kept.values()) == 0:
        raise ValueError(
            f"no document survived preparation (dropped: {dict(dropped)}); check the inputs, or relax the filters "
            "(min_chars, min_turkish_score, max_junk_ratio)"
        )

    manifest: dict = {}
    if out_dir is not None:
        from datasets import Dataset, DatasetDict, Features, Value

        features = Features({"text": Value("string"), "source": Value("string"), "id": Value("string")})
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            dd = DatasetDict({
                s: Dataset.from_json(str(work / f"{s}.jsonl"), features=features, cache_dir=str(work / "cache"))
                if kept[s] else Dataset.from_dict({"text": [], "source": [], "id": []}, features=features)
                for s in split_names
            })
            dd.save_to_disk(str(tmp))
            manifest = write_manifest(
                tmp, "corpus",
                inputs=input_hashes,
                config=asdict(config),
                kept={s: kept[s] for s in split_names},
                dropped=dict(sorted(dropped.items())),
                per_source={k: dict(sorted(v.items())) for k, v in per_source.items()},
                hub=dict(name=hub, config=hub_config, limit=limit) if hub else None,
            )
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return CorpusReport(Path(out_dir) if out_dir else None, {s: kept[s] for s in split_names}, dict(dropped),
                        {k: dict(v) for k, v in per_source.items()}, time.perf_counter() - t0, manifest)


def split_files(corpus_dir: str | os.PathLike, split: str = "validation", by_source: bool = True) -> dict[str, list[str]]:
    """Texts of one split of a prepared corpus, grouped by source (for ``trkit.tokstats.compare``)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(corpus_dir))[split]
    out: dict[str, list[str]] = collections.defaultdict(list)
    for t, s in zip(ds["text"], ds["source"]):
        out[s if by_source else split].append(t)
    return dict(out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", default=["default"],
                        help="'default' (offline Turkish corpus) or text/JSONL/parquet files")
    parser.add_argument("--hub", help="a hub dataset name to stream instead of --input (needs internet)")
    parser.add_argument("--hub-config", help="the hub dataset's config (e.g. tur_Latn)")
    parser.add_argument("--limit", type=int, help="read at most this many hub documents")
    parser.add_argument("--text-field", default="text", help="text column / JSON field")
    parser.add_argument("--out", required=True, help="output directory (datasets.load_from_disk reads it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d = CorpusConfig()
    for name in ("min_chars", "max_chars", "min_turkish_score", "max_junk_ratio", "near_dup_threshold",
                 "validation_percent", "test_percent", "contamination_ngram"):
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    config = CorpusConfig(**{k: getattr(args, k) for k in (
        "min_chars", "max_chars", "min_turkish_score", "max_junk_ratio", "near_dup_threshold",
        "validation_percent", "test_percent", "contamination_ngram")})
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    report = prepare_corpus(args.input, args.out, hub=args.hub, hub_config=args.hub_config, limit=args.limit,
                            text_field=args.text_field, config=config, overwrite=args.overwrite,
                            progress=not args.quiet)
    for row in report.table():
        print(f"{row['what']:<32} {row['documents']:>9}")
    print(f"wrote {report.out_dir} in {report.seconds:.1f} s")
    return 0
