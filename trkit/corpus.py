"""Turkish corpus preparation: normalise, filter, deduplicate, split, check contamination, save.

Pipeline, one document at a time (memory stays flat except the dedup indexes):

1. **read**: local text (one document per line), JSONL/JSON lines (a text field), parquet, a hub dataset
   (``datasets`` streaming, with a document limit) or the offline default corpus. gzip, bzip2 and xz
   files are read as they are (recognised by their first bytes, whatever the name); other archives
   (zip, zstd, 7z) are refused with a message. Lines are split on ``\n`` only (as ``vocab`` does; not
   Python's ``splitlines``, which also splits on \x0b \x0c \x1c \x85 \u2028) and read as bytes with
   a length cap, so invalid UTF-8, NUL bytes, empty files and enormous lines are counted and dropped
   instead of crashing the run or filling memory. A UTF-8 byte-order mark at the start of a line is
   removed (it would otherwise be learned as part of the first word).
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
   ``save_to_disk`` (an empty split is written as one empty shard, so ``datasets.load_from_disk``
   reads it as an empty dataset) plus ``trkit_manifest.json`` with counts kept and dropped per reason
   and source, parameters and hashes of the inputs. The output directory is checked before any work
   (``trkit.options.check_output``: it may not be, contain or lie inside an input, and only a trkit
   output is ever replaced) and written atomically; the work directory in the temp folder is removed
   on success, error and Ctrl-C, and one left by a killed run is removed by the next run.

:func:`text_sources` and :func:`read_documents` are how the measuring stages (``tokstats``, ``bpc``)
name and read their texts: files, a ``trkit corpus`` directory's split, or the offline ``validation``
split and ``english`` text, each read strictly (invalid UTF-8 is an error naming the file and line).
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

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


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open))
_ARCHIVES = ((b"PK\x03\x04", "a zip archive"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
             (b"7z\xbc\xaf\x27\x1c", "a 7z archive"))
BOM = b"\xef\xbb\xbf"


def open_text_bytes(path: str | os.PathLike):
    """Open a local file for reading bytes: plain, or gzip / bzip2 / xz (by magic bytes) decompressed
    on the fly. A directory, a missing file or another archive format is a clear error."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a text file: pass the files inside it "
                                f"(e.g. {path}/*.txt)" + (" or, to use a `trkit corpus` output, the directory "
                                                          "itself where a stage asks for a corpus directory"
                                                          if (path / "trkit_manifest.json").is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(10)
    for sig, what in _ARCHIVES:
        if magic.startswith(sig):
            raise ValueError(f"{path} is {what}: extract or decompress it first (trkit reads plain, gzip, bzip2 "
                             "and xz text files)")
    for sig, opener in _COMPRESSED:
        if magic.startswith(sig):
            return opener(path, "rb")
    # bzip2: "BZh" + block size digit + the block (pi) or end-of-stream (sqrt pi) magic, so text that
    # merely starts with "BZh" is not mistaken for it
    if magic[:3] == b"BZh" and magic[3:4].isdigit() and magic[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return bz2.open(path, "rb")
    return open(path, "rb")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a truncated or corrupt compressed file's low-level error into one that names the file."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (EOFError, OSError, lzma.LZMAError) as exc:
        raise ValueError(f"{path} could not be read to the end ({type(exc).__name__}: {exc}): the compressed "
                         "file is truncated or damaged; re-download or re-compress it") from None


def source_name(path: Path) -> str:
    """A file's source name: its stem without a compression suffix (``web.txt.gz`` -> ``web``)."""
    name = path.name
    for ext in (".gz", ".gzip", ".bz2", ".xz"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return Path(name).stem or path.name


def _inner_suffix(path: Path) -> str:
    """``.txt`` for ``a.txt.gz``: the format of a compressed file is the suffix before the compression's."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".gzip", ".bz2", ".xz"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_lines(path: Path, max_bytes: int, dropped: collections.Counter) -> Iterator[str]:
    """Lines of a file as str; over-long lines, invalid UTF-8 and NUL bytes are counted and skipped."""
    with _reading(path), open_text_bytes(path) as f:
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
            if line.startswith(BOM):
                line = line[len(BOM):]
            try:
                yield line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                dropped["invalid_utf8"] += 1


def iter_file(path: str | os.PathLike, config: CorpusConfig, dropped: collections.Counter,
              text_field: str = "text") -> Iterator[str]:
    """Documents of one local file (.txt: one per line; .jsonl/.json: ``text_field``; .parquet)."""
    path = Path(path)
    _check_input_file(path)
    if path.stat().st_size == 0:
        dropped["empty_file"] += 1
        return
    suffix = _inner_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow's ArrowInvalid & co: say which file
            raise ValueError(f"{path} is not a readable parquet file ({exc}); pass a valid parquet, text or JSONL "
                             "file") from None
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
            t = jsonl_text(line, text_field, dropped)
            if t is not None:
                yield t
        else:
            yield line


def jsonl_text(line: str, field: str, dropped: collections.Counter) -> str | None:
    """The ``field`` string of one JSONL record; None (counted in ``dropped`` as ``bad_json`` or ``not_text``,
    blank lines not counted) when there is none."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        dropped["bad_json"] += 1
        return None
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        dropped["not_text"] += 1
        return None
    return text


def _check_input_file(path: Path) -> None:
    """A local input must be a readable file (a directory or a missing path is named, before any work)."""
    if path.is_dir():
        hint = (" It is a `trkit corpus` output: to learn a vocabulary from it pass it to `trkit vocab --corpus`; "
                "to re-prepare, pass its source files." if (path / "trkit_manifest.json").is_file() else
                f" Pass the files inside it (e.g. --input {path}/*.txt).")
        raise IsADirectoryError(f"--input {path} is a directory, not a text/JSONL/parquet file.{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file; pass text/JSONL/parquet files (plain or .gz), "
                                "a hub dataset (--hub NAME) or 'default'")


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
            name = source_name(p)
            out[name if name not in out else str(p)] = p
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
    """Run the pipeline (module docstring) on local files / the default corpus, or on ``hub`` (streaming).

    Every input file and ``out_dir`` are checked before any work (``trkit.options.check_output``).
    """
    from trkit.progress import tqdm

    from trkit.artifacts import atomic_directory, sha256_file
    from trkit.options import check_output

    config = config or CorpusConfig()
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    t0 = time.perf_counter()
    dropped: collections.Counter = collections.Counter()
    per_source: dict[str, collections.Counter] = {}
    input_paths: list[Path] = []
    if hub:
        sources: dict[str, Any] = {hub: ("hub", hub)}
    else:
        sources = resolve_inputs(inputs)
        for src in sources.values():
            for p in (src if isinstance(src, list) else [src]):
                if isinstance(p, (str, os.PathLike)):
                    _check_input_file(Path(p))
                    input_paths.append(Path(p))
    if out_dir is not None:  # before reading anything: an --out that would destroy an input is refused here
        check_output(out_dir, inputs=input_paths, overwrite=overwrite)
    input_hashes = ({hub: f"hub:{hub}:{hub_config}:limit={limit}"} if hub else
                    {str(p): sha256_file(p) for p in input_paths})

    def documents(src, drops) -> Iterator[str]:
        if isinstance(src, tuple) and src[0] == "hub":
            yield from iter_hub(src[1], limit, hub_config, text_field=text_field)
            return

        def every():
            for p in (src if isinstance(src, list) else [src]):
                if isinstance(p, (str, os.PathLike)):
                    yield from iter_file(p, config, drops, text_field)
                else:
                    yield p

        yield from (every() if limit is None else itertools.islice(every(), limit))  # limit: per source

    with _work_directory() as work:
        kept = _filter_into(work, sources, documents, config, dropped, per_source, tqdm, progress)
        _remove_contaminated(work, config, kept, dropped, per_source)
        if sum(kept.values()) == 0:
            raise ValueError(
                f"no document survived preparation (dropped: {dict(dropped)}); check the inputs, or relax the "
                "filters (--min-chars, --min-turkish-score, --max-junk-ratio)"
            )
        manifest: dict = {}
        if out_dir is not None:
            with atomic_directory(out_dir, overwrite=overwrite, inputs=input_paths) as tmp:
                manifest = _save(tmp, work, kept, dict(
                    inputs=input_hashes,
                    config=asdict(config),
                    kept={s: kept[s] for s in SPLITS},
                    dropped=dict(sorted(dropped.items())),
                    per_source={k: dict(sorted(v.items())) for k, v in per_source.items()},
                    hub=dict(name=hub, config=hub_config, limit=limit) if hub else None,
                    limit_per_source=limit,
                ))
    return CorpusReport(Path(out_dir) if out_dir else None, {s: kept[s] for s in SPLITS}, dict(dropped),
                        {k: dict(v) for k, v in per_source.items()}, time.perf_counter() - t0, manifest)


SPLITS = ("train", "validation", "test")
WORK_NAME = "trkit-corpus"  # work directories: <tmp>/.trkit-corpus.<host>-<pid>.XXXX.partial


@contextlib.contextmanager
def _work_directory() -> Iterator[Path]:
    """A private work directory in the temp folder, removed on success, error and Ctrl-C; one that a
    killed run left behind (its pid is gone) is removed when the next run starts."""
    from trkit.artifacts import _tag, sweep_stale

    parent = Path(tempfile.gettempdir())
    sweep_stale(parent, WORK_NAME)
    work = Path(tempfile.mkdtemp(prefix=f".{WORK_NAME}.{_tag()}.", suffix=".partial", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _filter_into(work, sources, documents, config, dropped, per_source, tqdm, progress) -> collections.Counter:
    """Steps 2-6: read, normalise, filter, dedup and split every document into ``work/<split>.jsonl``."""
    exact: set[bytes] = set()
    near = NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_words)
    kept: collections.Counter = collections.Counter()
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(work / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        bar = stack.enter_context(tqdm(desc="preparing corpus", unit="doc", disable=not progress))
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
    return kept


def _remove_contaminated(work, config, kept, dropped, per_source) -> None:
    """Step 7: drop validation/test documents sharing a word n-gram with a train document."""
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


FEATURES = {"text": "string", "source": "string", "id": "string"}


def _features():
    from datasets import Features, Value

    return Features({k: Value(v) for k, v in FEATURES.items()})


def _save(tmp: Path, work: Path, kept, fields: dict) -> dict:
    """Step 8: the DatasetDict and the manifest into the staging directory ``tmp``.

    ``save_to_disk`` writes no data file for a split of 0 rows unless told to write one shard, and
    ``load_from_disk`` then fails with an IndexError; so every empty split gets ``num_shards=1``.
    """
    from datasets import Dataset, DatasetDict

    from trkit.artifacts import write_manifest

    features = _features()
    dd = DatasetDict({
        s: Dataset.from_json(str(work / f"{s}.jsonl"), features=features, cache_dir=str(work / "cache"))
        if kept[s] else Dataset.from_dict({k: [] for k in FEATURES}, features=features)
        for s in SPLITS
    })
    dd.save_to_disk(str(tmp), num_shards={s: 1 for s in SPLITS if not kept[s]})
    return write_manifest(tmp, "corpus", **fields)


def load_corpus(corpus_dir: str | os.PathLike, verify: bool = True):
    """The ``datasets.DatasetDict`` of a ``trkit corpus`` directory (train/validation/test; a split can
    be empty). The manifest is read first (with ``verify``: every file's hash), so a directory that
    is not a corpus, or a half-written one, is a clear error. Directories written by older trkit
    versions without a data file for an empty split load too."""
    from datasets import Dataset, DatasetDict, load_from_disk

    from trkit.artifacts import read_manifest

    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"{corpus_dir}: no such corpus directory; pass the --out of `trkit corpus`")
    manifest = read_manifest(corpus_dir, verify=verify)
    if manifest.get("stage") != "corpus":
        raise ValueError(f"{corpus_dir} was written by stage {manifest.get('stage')!r}, not `trkit corpus`; pass "
                         "the directory that `python -m trkit corpus --out DIR` wrote")
    try:
        return load_from_disk(str(corpus_dir))
    except IndexError:  # an empty split saved without a data file (older trkit): load split by split
        kept = manifest.get("kept", {})
        return DatasetDict({
            s: Dataset.load_from_disk(str(corpus_dir / s)) if kept.get(s) else
            Dataset.from_dict({k: [] for k in FEATURES}, features=_features())
            for s in SPLITS if (corpus_dir / s).is_dir()
        })


def split_files(corpus_dir: str | os.PathLike, split: str = "validation", by_source: bool = True) -> dict[str, list[str]]:
    """Texts of one split of a prepared corpus, grouped by source (for ``trkit.tokstats.compare``).

    An empty split gives ``{}``."""
    dd = load_corpus(corpus_dir)
    if split not in dd:
        raise ValueError(f"{corpus_dir} has no split {split!r}; it has {', '.join(dd)}")
    ds = dd[split]
    out: dict[str, list[str]] = collections.defaultdict(list)
    for t, s in zip(ds["text"], ds["source"]):
        out[s if by_source else split].append(t)
    return dict(out)


# --------------------------------------------------------------------------------------------
# Texts for the measuring stages (tokstats, bpc): named sources, read strictly
# --------------------------------------------------------------------------------------------

MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are measured as consecutive pieces of at most this size


def read_documents(path: str | os.PathLike, unit: str = "line", max_chars: int | None = MAX_DOCUMENT_CHARS,
                   notes: list[str] | None = None) -> list[str]:
    """Documents of a UTF-8 text file, read strictly (for measuring, where a dropped line would change
    the result): one per non-blank line (``unit="line"``; lines end at ``\n`` only, a trailing ``\r``
    and a leading byte-order mark are removed) or the whole file (``"file"``). gzip/bzip2/xz files are
    decompressed on the fly. Invalid UTF-8 is an error naming the file and line.

    A document longer than ``max_chars`` characters is split into consecutive pieces at whitespace
    (each piece is then its own document; for a measure with a context of a few thousand tokens this
    changes nothing but bounds memory) and a line saying so is appended to ``notes``.
    """
    path = Path(path)
    if unit not in ("line", "file"):
        raise ValueError(f"unit must be 'line' or 'file', not {unit!r}")
    docs: list[str] = []
    with _reading(path), open_text_bytes(path) as f:
        if unit == "file":
            raw = f.read()
            if raw.startswith(BOM):
                raw = raw[len(BOM):]
            lines: Iterable[bytes] = [raw]
        else:
            lines = f
        for number, line in enumerate(lines, 1):
            if line.startswith(BOM):
                line = line[len(BOM):]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"line {number}" if unit == "line" else f"byte {exc.start}"
                raise ValueError(f"{path} {where} is not valid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                                 f"{exc.start}): re-encode the file as UTF-8 (or clean it with `trkit corpus`)") from None
            if unit == "line":
                text = text.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            if max_chars and len(text) > max_chars:
                pieces = split_long_text(text, max_chars)
                if notes is not None:
                    notes.append(f"{path} {'line ' + str(number) if unit == 'line' else '(whole file)'}: {len(text):,} "
                                 f"characters, measured as {len(pieces)} consecutive pieces of at most "
                                 f"{max_chars:,} characters (each starts a fresh context)")
                docs.extend(pieces)
            else:
                docs.append(text)
    if not docs:
        raise ValueError(f"{path} holds no text to measure; pass a non-empty UTF-8 text file")
    return docs


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of at most ``max_chars`` characters, cut after the last whitespace of each
    piece where there is one; the pieces concatenate back to ``text``."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\t", start + max_chars // 2, end))
        end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def text_language(documents: Iterable[str], sample: int = 300) -> str:
    """``"Turkish"``, ``"English"`` or ``"other"`` for a source, from its first ``sample`` documents:
    mean ``trkit.turkish.turkish_score`` >= 0.5 is Turkish; else a share of English stopwords among
    the words >= 0.1 is English. (Measured: the offline Turkish validation sources score 0.78-0.93,
    the English text 0.0 with 23% English stopwords.)"""
    docs = [d for _, d in zip(range(sample), documents)]
    if not docs:
        return "other"
    if sum(turkish.turkish_score(d) for d in docs) / len(docs) >= 0.5:
        return "Turkish"
    words = [turkish.lower(w) for d in docs for w in turkish.split_words(d)]
    if words and sum(w in turkish.ENGLISH_STOPWORDS for w in words) / len(words) >= 0.1:
        return "English"
    return "other"


@dataclass
class TextSource:
    """One named text a measuring stage reads: a file or a corpus split's documents, with its language."""

    name: str
    language: str
    path: Path | None = None
    documents: list[str] | None = None
    origin: str = ""
    given: str = ""  # a file item as the user wrote it (bpc's report keys files by it)
    note: str = ""  # said once for all sources that share it

    def read(self, unit: str = "line", max_chars: int | None = MAX_DOCUMENT_CHARS,
             notes: list[str] | None = None) -> list[str]:
        docs = self.documents if self.documents is not None else read_documents(
            self.path, unit=unit, max_chars=max_chars, notes=notes)
        if not self.language:
            self.language = text_language(docs)
        return docs


TEXT_HELP = ("text files (one document per line; plain, .gz, .bz2 or .xz), a `trkit corpus` directory (its --split "
             "per source), 'validation' (the offline corpus's held-out validation split per source plus English) "
             "or 'english' (the offline English text)")


def text_sources(items: Iterable[str | os.PathLike], split: str = "validation", option: str = "--text") -> list[TextSource]:
    """Resolve a measuring stage's ``--text`` items (see ``TEXT_HELP``) to named sources, checking each
    before any model or tokenizer is loaded. Each source's ``origin`` says where it comes from."""
    out: dict[str, TextSource] = {}

    def add(src: TextSource) -> None:
        if src.path is not None and any(o.path == src.path for o in out.values()):
            return  # 'validation english' or a file named twice: measured once
        name = src.name
        if name in out:
            name = str(src.path) if src.path is not None else f"{name}#{len(out)}"
        src.name = name
        out[name] = src

    for item in items:
        text = str(item)
        if text in ("validation", "english"):
            from trkit import assets

            if text == "validation":
                vfiles = assets.validation_files()
                for k, v in vfiles.items():
                    add(TextSource(f"tr-{k}", "Turkish", path=Path(v),
                                   origin=f"the offline corpus's held-out validation split: {v}", note=(
                                       "'validation' is the offline corpus's held-out split, not a split that "
                                       "`trkit corpus` wrote: to measure that one, pass its directory to --text")))
            eng = assets.english_file()
            add(TextSource("english", "English", path=Path(eng), origin=f"the offline English text ({eng})"))
            continue
        p = Path(text)
        if p.is_dir():
            if not (p / "trkit_manifest.json").is_file():
                raise ValueError(f"{option} {p} is a directory but not a `trkit corpus` output (no trkit_manifest.json); "
                                 "pass text files, a corpus directory, 'validation' or 'english'")
            groups = split_files(p, split)
            if not groups:
                raise ValueError(f"{option} {p}: its {split!r} split is empty (see 'kept' in its trkit_manifest.json); "
                                 "pass --split with a non-empty split"
                                 + (f", or prepare the corpus with a larger --{split}-percent" if split != "train" else ""))
            for k, docs in groups.items():
                add(TextSource(f"tr-{k}", "Turkish", documents=docs,
                               origin=f"the {split!r} split of the `trkit corpus` directory {p}"))
            continue
        if not p.is_file():
            raise FileNotFoundError(f"{option} {text}: no such file or corpus directory; pass {TEXT_HELP}")
        with open_text_bytes(p):  # a zip / zstd archive is refused here, before anything is loaded
            pass
        add(TextSource(source_name(p), "", path=p, origin=str(p), given=text))
    if not out:
        raise ValueError(f"no text: pass {option} with {TEXT_HELP}")
    return list(out.values())


def describe_sources(sources: list[TextSource]) -> str:
    """Lines saying where each measured text comes from (what ``tokstats`` and ``bpc`` print to stderr)."""
    lines = [f"  {s.name:<16} {s.language or '?':<8} {s.origin}" for s in sources]
    return "\n".join(lines + [f"  note: {n}" for n in dict.fromkeys(s.note for s in sources if s.note)])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    from trkit.options import open_unit_interval, percent, positive_int, unit_interval

    parser.add_argument("--input", nargs="+", default=["default"],
                        help="'default' (offline Turkish corpus) or text/JSONL/parquet files (plain, .gz, .bz2, .xz)")
    parser.add_argument("--hub", help="a hub dataset name to stream instead of --input (needs internet)")
    parser.add_argument("--hub-config", help="the hub dataset's config (e.g. tur_Latn)")
    parser.add_argument("--limit", type=positive_int, help="read at most this many documents (of a hub dataset, or of each local source)")
    parser.add_argument("--text-field", default="text", help="text column / JSON field")
    parser.add_argument("--out", required=True, help="output directory (datasets.load_from_disk reads it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out that trkit wrote")
    d = CorpusConfig()
    types = {"min_chars": positive_int, "max_chars": positive_int, "min_turkish_score": unit_interval,
             "max_junk_ratio": unit_interval, "near_dup_threshold": open_unit_interval, "validation_percent": percent,
             "test_percent": percent, "contamination_ngram": positive_int}
    helps = {"validation_percent": "share of documents held out as validation (0 = none: an empty split)",
             "test_percent": "share of documents held out as test (0 = none: an empty split)",
             "near_dup_threshold": "MinHash Jaccard similarity at which a document is a near duplicate, in (0, 1]",
             "contamination_ngram": "validation/test documents sharing a word n-gram this long with train are dropped"}
    for name, kind in types.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                            help=helps.get(name, f"default {getattr(d, name)}"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


CONFIG_OPTIONS = ("min_chars", "max_chars", "min_turkish_score", "max_junk_ratio", "near_dup_threshold",
                  "validation_percent", "test_percent", "contamination_ngram")


def run_cli(args) -> int:
    if args.validation_percent + args.test_percent >= 100:
        raise ValueError(f"--validation-percent {args.validation_percent:g} + --test-percent {args.test_percent:g} "
                         "leaves no training documents: their sum must be below 100")
    if args.max_chars < args.min_chars:
        raise ValueError(f"--max-chars {args.max_chars} is below --min-chars {args.min_chars}")
    config = CorpusConfig(**{k: getattr(args, k) for k in CONFIG_OPTIONS})
    report = prepare_corpus(args.input, args.out, hub=args.hub, hub_config=args.hub_config, limit=args.limit,
                            text_field=args.text_field, config=config, overwrite=args.overwrite,
                            progress=not args.quiet)
    for row in report.table():
        print(f"{row['what']:<32} {row['documents']:>9}")
    empty = [s for s, n in report.kept.items() if not n]
    if empty:
        print(f"note: empty split(s): {', '.join(empty)} (they load as empty datasets)")
    print(f"wrote {report.out_dir} in {report.seconds:.1f} s")
    return 0
