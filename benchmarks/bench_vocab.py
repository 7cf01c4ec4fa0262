"""Benchmark of trkit.vocab: speed and memory beside HF tokenizers' BpeTrainer, quality, generalisation.

    .venv/bin/python benchmarks/bench_vocab.py                        # speed 1x/10x + quality -> results/vocab.json
    .venv/bin/python benchmarks/bench_vocab.py --part scale           # 1x/10x/100x curve     -> results/vocab_scale.json
    .venv/bin/python benchmarks/bench_vocab.py --part generalization  # unseen registers      -> results/vocab_generalization.json

Speed and scale: each run is a fresh child process (wall time, CPU time of it and its worker
processes, peak memory). Peak memory (``peak_mb``) is the larger of the kernel's high-water RSS of the
child and the largest sum of PSS (proportional set size: pages shared after a fork split between the
processes sharing them) over the child and its counting workers, sampled once a second (a sample costs
~30 ms of CPU, so sampling faster would distort the CPU times).
* ours: ``extend_tokenizer('qwen3', corpus, 20000, out)`` end to end (load, count, learn, save), progress
  bars on (their cost is part of the measurement), where the time goes from ``result.seconds``;
* peer: ``tokenizers.trainers.BpeTrainer`` training a fresh 20,000-merge byte-level BPE with Qwen's
  normaliser and pre-tokeniser on the same files, in the same run.
Scales: the default running text (1x, 5.7 MB) and 10x / 100x built from distinct shuffles of each
source's documents (copy k is the source shuffled with seed k), written to a temporary directory and
deleted afterwards. Shuffles repeat the same words, so the number of distinct words (what merging
costs) stays that of 1x; only counting grows. The merging cost of many distinct words is shown by the
word-frequency tables (trnlp: 500k forms) in the quality part. The machine has 2 cores shared with
other jobs: ratios measured in the same run are the steadier number.

Quality: 20k Qwen3 (and SmolLM2) extension on the default corpus, measured on its validation split and
on English (pydoc topics): % fewer tokens, round trips, coarsening, unreachable tokens.

Generalisation: for each variant (the running text alone; with the word-frequency tables, each alone
and both, lowercase or cased from the text, at table weights; new tokens made from the pieces of a
SentencePiece model trained on the same running text), % fewer tokens and share of new tokens never used
on text of registers not trained on: (a) Turkish software messages (the system's gettext catalogues
under /usr/share/locale/tr, when present), with merges learned on all four running-text sources; (b)
each source of the default corpus held out in turn (learned on the other three, measured on all of its
text). The tables never contain the held-out text (they are word lists of other corpora). For (a) also
the English change and the in-domain tokens per word on the validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
N_NEW = 20_000


# ------------------------------------------------------------------------------------------ children


class _PeakMemory:
    """Largest summed PSS (MB) of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 1.0):
        import psutil

        self.proc, self.peak, self.interval = psutil.Process(), 0.0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that just exited
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _child(kind: str, files: list[str], out: str) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    with _PeakMemory() as mem:
        if kind == "ours":
            from trkit.vocab import extend_tokenizer

            sources = {Path(f).stem: Path(f) for f in files}
            res = extend_tokenizer("qwen3", sources, N_NEW, out, progress=True)
            extra = {"n_new_tokens": res.n_new_tokens, "phases_s": {k: round(v, 2) for k, v in res.seconds.items()}}
        else:
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers

            from trkit.assets import qwen3_tokenizer_dir

            qwen = Tokenizer.from_file(str(qwen3_tokenizer_dir() / "tokenizer.json"))
            tok = Tokenizer(models.BPE())
            tok.normalizer, tok.pre_tokenizer = qwen.normalizer, qwen.pre_tokenizer
            trainer = trainers.BpeTrainer(vocab_size=256 + N_NEW, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train(files, trainer)
            Path(out).mkdir(parents=True, exist_ok=True)
            tok.save(str(Path(out) / "tokenizer.json"))
            extra = {"vocab_size": tok.get_vocab_size()}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += ru_children.ru_utime + ru_children.ru_stime  # worker processes (counting)
    # VmHWM of this process (ru_maxrss would carry over the high-water mark of the process that forked us)
    with open("/proc/self/status") as f:
        hwm_mb = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    peak = max(mem.peak, hwm_mb)
    print(json.dumps({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_mb": round(peak, 1),
                      "peak_pss_mb_sampled": round(mem.peak, 1),
                      "peak_rss_mb_main_process": round(hwm_mb, 1),
                      "peak_rss_mb_largest_worker": round(ru_children.ru_maxrss / 1024, 1), **extra}))


def _run_child(kind: str, files: list[Path]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", kind, "--out", str(Path(tmp) / "out"),
                            *map(str, files)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"child {kind} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(time.perf_counter() - t0, 2)  # including interpreter start and imports
        bars = [line for line in p.stderr.replace("\r", "\n").splitlines() if "counting words" in line]
        if bars:
            r["progress_bar_last"] = bars[-1].strip()[:160]
        return r


# ------------------------------------------------------------------------------------------ texts


def software_messages() -> tuple[list[str], dict]:
    """Turkish UI/documentation strings from the system's gettext catalogues (stdlib reader)."""
    import gettext
    import glob
    import hashlib

    files = sorted(glob.glob("/usr/share/locale/tr/LC_MESSAGES/*.mo")) + sorted(
        glob.glob("/usr/share/vim/vim*/lang/tr/LC_MESSAGES/*.mo"))
    files = [f for f in files if not os.path.basename(f).startswith("iso")]  # skip country/language name lists
    docs: dict[str, None] = {}
    for f in files:
        with open(f, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
        for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])):
            if k and isinstance(v, str):
                v = " ".join(v.split())
                if len(v) >= 3:
                    docs[v] = None
    out = list(docs)
    h = hashlib.sha256("\n".join(out).encode("utf-8")).hexdigest()
    return out, {"catalogues": len(files), "documents": len(out), "chars": sum(map(len, out)), "sha256": h}


def shuffled_copies(files: list[Path], times: int, directory: Path) -> list[Path]:
    """Each file's lines (documents), ``times`` copies, copy k shuffled with seed k, in ``directory``."""
    out = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        g = directory / f.name
        with open(g, "w", encoding="utf-8") as fh:
            for k in range(times):
                order = list(lines)
                random.Random(k).shuffle(order)
                fh.writelines(order)
        out.append(g)
    return out


# ------------------------------------------------------------------------------------------ parts


def part_speed(scales: tuple[int, ...]) -> dict:
    from trkit.assets import corpus_files

    files = [corpus_files()[k] for k in sorted(corpus_files())]
    size_1x = sum(f.stat().st_size for f in files)
    out: dict = {"corpus_bytes_1x": size_1x, "scales": {}}
    for scale in scales:
        with tempfile.TemporaryDirectory(prefix="bench-vocab-") as tmp:
            fs = files if scale == 1 else shuffled_copies(files, scale, Path(tmp))
            row: dict = {"corpus_bytes": sum(f.stat().st_size for f in fs)}
            for kind in ("ours", "hf_bpe_trainer"):
                row[kind] = _run_child(kind, fs)
                print(kind, f"{scale}x", row[kind], file=sys.stderr, flush=True)
            for m in ("wall_s", "cpu_s", "peak_mb"):
                row[f"ratio_ours_over_hf_{m}"] = round(row["ours"][m] / row["hf_bpe_trainer"][m], 3)
            out["scales"][f"{scale}x"] = row
    first = f"{scales[0]}x"
    for s in out["scales"]:
        for kind in ("ours", "hf_bpe_trainer"):
            for m in ("wall_s", "cpu_s"):
                out["scales"][s][f"{kind}_growth_{m}_vs_{first}"] = round(
                    out["scales"][s][kind][m] / out["scales"][first][kind][m], 2)
    return out


def part_quality() -> dict:
    from tokenizers import Tokenizer

    from trkit import assets, tokstats, vocab

    out = {}
    for base in ("qwen3", "smollm2"):
        with tempfile.TemporaryDirectory() as tmp:
            res = vocab.extend_tokenizer(base, "default", N_NEW, Path(tmp) / "ext", progress=False)
            texts = {f"tr-{k}": v for k, v in assets.validation_files().items()}
            texts["tr-validation-all"] = assets.validation_file()
            texts["english"] = assets.english_file()
            rep = tokstats.compare(vocab.load_base(base).backend, res.out_dir, texts)
            ext = Tokenizer.from_file(str(res.out_dir / "tokenizer.json"))
            unreachable = sum([x.id for x in ext.model.tokenize(t["token"])] != [t["id"]] for t in res.new_tokens)
            keep = ("documents", "words", "base_tokens", "tokens", "base_fertility", "fertility", "pct_fewer",
                    "new_tokens_used", "roundtrip_failures", "coarsening_violations")
            out[base] = {
                "corpus": {k: v.get("kind") for k, v in res.manifest["corpus_sources"].items()},
                "n_new_tokens": res.n_new_tokens,
                "base_vocab_size": res.base_vocab_size,
                "unreachable_new_tokens": unreachable,
                "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
                "sources": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items() if kk in keep}
                            for k, v in rep["sources"].items()},
            }
            print(base, json.dumps(out[base]["sources"]["tr-validation-all"]), file=sys.stderr, flush=True)
    return out


RULES = {
    "frequency": dict(selection="frequency", morphology=False),
    "frequency+morphology": dict(selection="frequency", morphology=True),
    "balanced (equal source totals)": dict(selection="balanced", balance_exponent=1.0, morphology=False),
    "balanced+morphology": dict(selection="balanced", balance_exponent=1.0, morphology=True),
    "half-balanced (default)": dict(selection="balanced", balance_exponent=0.5, morphology=False),
    "half-balanced+morphology": dict(selection="balanced", balance_exponent=0.5, morphology=True),
    "half-balanced+sqrt word counts": dict(selection="balanced", balance_exponent=0.5, word_exponent=0.5),
}

# corpus variants of the vocabulary stage: word-frequency tables added to the running text, or new tokens
# made from a SentencePiece model's pieces (trained on the same running text) instead of learned merges
VARIANTS = {
    "running text only": dict(tables=()),
    "+ wordfreq": dict(tables=("wordfreq",), table_casing="text"),
    "+ trnlp": dict(tables=("trnlp",), table_casing="text"),
    "+ both tables, lowercase": dict(tables=("wordfreq", "trnlp"), table_casing="lower"),
    "+ both tables (default: cased from text)": dict(tables=("wordfreq", "trnlp"), table_casing="text"),
    "+ both tables, lowercase, 500k words each": dict(tables=("wordfreq", "trnlp"), table_casing="lower",
                                                      max_table_words=500_000),
    "+ both tables, lowercase, weight 3": dict(tables=("wordfreq", "trnlp"), table_casing="lower", table_weight=3.0),
    "+ both tables, lowercase, weight 0.3": dict(tables=("wordfreq", "trnlp"), table_casing="lower",
                                                 table_weight=0.3),
    "candidates: SentencePiece unigram 32k": dict(tables=(), candidates="unigram"),
    "candidates: SentencePiece BPE 32k": dict(tables=(), candidates="bpe"),
}


def _train_sentencepiece(files: list[Path], model_type: str, directory: Path) -> Path:
    import sentencepiece as spm

    prefix = directory / f"sp-{model_type}"
    spm.SentencePieceTrainer.train(input=[str(f) for f in files], model_prefix=str(prefix), vocab_size=32_000,
                                   model_type=model_type, character_coverage=1.0, max_sentence_length=1 << 18,
                                   num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


def part_generalization(rule_names: list[str], variant_names: list[str], only: list[str] | None = None) -> dict:
    from tokenizers import Tokenizer

    from trkit import assets, tokstats, vocab

    base = vocab.load_base("qwen3")
    train, val = assets.corpus_files(), assets.validation_files()
    soft, soft_info = software_messages()
    settings = {"software-messages (all 4 sources)": (dict(train), soft)} if soft else {}
    for held in sorted(train):
        settings[f"held-out {held}"] = ({k: v for k, v in train.items() if k != held},
                                        tokstats.read_documents(train[held]) + tokstats.read_documents(val[held]))
    if only:
        settings = {k: v for k, v in settings.items() if any(o in k for o in only)}
    t0 = time.perf_counter()
    text_counts = {name: vocab.count_words(base, srcs, progress=False) for name, (srcs, _) in settings.items()}
    lower_tables: dict[tuple, tuple] = {}
    cased_tables: dict[tuple, tuple] = {}

    def with_tables(name: str, tables: tuple[str, ...], casing: str, max_words: int) -> vocab.WordCounts:
        words = text_counts[name]
        extra = []
        for t in tables:
            if casing == "lower":
                if (t, max_words) not in lower_tables:
                    lower_tables[(t, max_words)] = vocab.table_word_counts(base, assets.word_table_file(t),
                                                                           casing="lower", max_words=max_words)
                extra.append((t, lower_tables[(t, max_words)]))
            else:
                if (t, name, max_words) not in cased_tables:
                    cased_tables[(t, name, max_words)] = vocab.table_word_counts(
                        base, assets.word_table_file(t), words.total(), casing="text", max_words=max_words)
                extra.append((t, cased_tables[(t, name, max_words)]))
        return vocab.WordCounts(words.sources + [t for t, _ in extra], words.counts + [c for _, (c, _) in extra],
                                words.corpus_sha256, words.documents + [s["words"] for _, (_, s) in extra],
                                words.bytes + [0] * len(extra), words.kinds + ["word counts"] * len(extra))

    print(f"counted in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    english = tokstats.read_documents(assets.english_file())
    rows: list[tuple[str, dict, dict]] = [(r, RULES[r], VARIANTS["running text only"]) for r in rule_names]
    rows += [(v, RULES["half-balanced (default)"], VARIANTS[v]) for v in variant_names]
    table: dict = {}
    for row_name, params, variant in rows:
        row: dict = {}
        for name, (srcs, texts) in settings.items():
            t0 = time.perf_counter()
            words = with_tables(name, variant["tables"], variant.get("table_casing", vocab.DEFAULT_TABLE_CASING),
                                variant.get("max_table_words", vocab.DEFAULT_MAX_TABLE_WORDS))
            if variant.get("candidates"):
                with tempfile.TemporaryDirectory() as tmp:
                    model = _train_sentencepiece(list(srcs.values()), variant["candidates"], Path(tmp))
                    learned = vocab.candidate_merges(base, words, vocab.read_candidates(model), N_NEW, progress=False)
                extra = {"candidates": learned.candidates}
            else:
                learned = vocab.learn_merges(base, words, N_NEW, progress=False,
                                             table_weight=variant.get("table_weight", 1.0), **params)
                extra = {}
            secs = time.perf_counter() - t0
            ext = Tokenizer.from_str(json.dumps(vocab.extended_tokenizer_json(base, learned)))
            st = tokstats.compare(base.backend, ext, {"x": texts})["sources"]["x"]
            row[name] = {"pct_fewer": round(st["pct_fewer"], 2), "n_new_tokens": len(learned.merges),
                         "pct_new_never_used": round(100 * st["new_tokens_never_used"] / max(1, len(learned.merges)), 1),
                         "learn_s": round(secs, 1), **extra}
            if name.startswith("software"):  # the all-sources model: in-domain fertility, English, boundaries
                rep = tokstats.compare(base.backend, ext, {"val": assets.validation_file(), "en": english},
                                       morphology=True)
                v, en = rep["sources"]["val"], rep["sources"]["en"]
                row["validation (all 4 sources)"] = {"fertility": round(v["fertility"], 4),
                                                     "pct_fewer": round(v["pct_fewer"], 2),
                                                     "morph_boundary_share": round(v["morph_boundary_share"], 4),
                                                     "base_fertility": round(v["base_fertility"], 4)}
                row["english"] = {"pct_fewer": round(en["pct_fewer"], 3), "tokens": en["tokens"],
                                  "base_tokens": en["base_tokens"]}
        unseen = [k for k in row if k.startswith(("held-out", "software"))]
        held = [k for k in unseen if k.startswith("held-out")]
        for label, keys in (("mean over held-out sources", held), ("mean over unseen registers", unseen)):
            if not keys:
                continue
            row[label] = {"pct_fewer": round(sum(row[k]["pct_fewer"] for k in keys) / len(keys), 2),
                          "pct_new_never_used": round(sum(row[k]["pct_new_never_used"] for k in keys) / len(keys), 1)}
        table[row_name] = row
        print(row_name, json.dumps(row), file=sys.stderr, flush=True)
    return {"software_messages": soft_info, "rules": {r: RULES[r] for r in rule_names},
            "variants": {v: VARIANTS[v] for v in variant_names}, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["main", "scale", "generalization"], default="main")
    ap.add_argument("--scales", type=int, nargs="+", default=None, help="scale part: multiples of the default text")
    ap.add_argument("--rules", nargs="*", default=None, help="generalization: selection rules (default: all)")
    ap.add_argument("--variants", nargs="*", default=None, help="generalization: corpus variants (default: all)")
    ap.add_argument("--settings", nargs="*", default=None, help="generalization: only settings containing these")
    ap.add_argument("--name", help="result file name (default by part)")
    ap.add_argument("--child", choices=["ours", "hf_bpe_trainer"])
    ap.add_argument("--out")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.files, args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = {"machine": f"{os.cpu_count()} cores (shared with other jobs while measured)",
            "load_average_at_start": os.getloadavg(), "python": sys.version.split()[0]}
    import tokenizers

    meta["tokenizers"] = tokenizers.__version__
    if args.part == "main":
        result = {"meta": meta, "n_new_tokens": N_NEW, "speed": part_speed(tuple(args.scales or (1, 10))),
                  "quality": part_quality()}
        name = "vocab.json"
    elif args.part == "scale":
        result = {"meta": meta, "n_new_tokens": N_NEW, "speed": part_speed(tuple(args.scales or (1, 10, 100)))}
        name = "vocab_scale.json"
    else:
        rules = list(RULES) if args.rules is None else args.rules
        variants = list(VARIANTS) if args.variants is None else args.variants
        result = {"meta": meta, "n_new_tokens": N_NEW, **part_generalization(rules, variants, args.settings)}
        name = "vocab_generalization.json"
    meta["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    (RESULTS / (args.name or name)).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
