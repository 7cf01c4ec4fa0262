"""Benchmark of trkit.vocab: speed and memory beside HF tokenizers' BpeTrainer, quality, generalisation.

    .venv/bin/python benchmarks/bench_vocab.py                      # speed + quality  -> results/vocab.json
    .venv/bin/python benchmarks/bench_vocab.py --part generalization #                  -> results/vocab_generalization.json

Speed: each run is a fresh child process (wall time, CPU time, peak RSS of that process).
* ours: ``extend_tokenizer('qwen3', corpus, 20000, out)`` end to end (load, count, learn, save);
* peer: ``tokenizers.trainers.BpeTrainer`` training a fresh 20,000-merge byte-level BPE with Qwen's
  normaliser and pre-tokeniser on the same files, in the same run.
Both on the default corpus (1x) and on each source file concatenated 10 times (10x), to show how cost
grows. The machine has 2 cores shared with other jobs: CPU seconds are the steadier number.

Quality: 20k Qwen3 (and SmolLM2) extension on the default corpus, measured on its validation split and
on English (pydoc topics): % fewer tokens, round trips, coarsening, unreachable tokens.

Generalisation: for each selection rule, % fewer tokens and share of new tokens never used on text of
registers not trained on: (a) Turkish software messages (the system's gettext catalogues under
/usr/share/locale/tr, when present), with merges learned on the whole default corpus; (b) each source
of the default corpus held out in turn (learned on the other three, measured on all of its text).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
N_NEW = 20_000


# ------------------------------------------------------------------------------------------ children


def _child(kind: str, files: list[str], out: str) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "ours":
        from trkit.vocab import extend_tokenizer

        sources = {Path(f).stem: Path(f) for f in files}
        res = extend_tokenizer("qwen3", sources, N_NEW, out, progress=False)
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
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                      "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), **extra}))


def _run_child(kind: str, files: list[Path]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", kind, "--out", str(Path(tmp) / "out"),
                            *map(str, files)], capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(time.perf_counter() - t0, 2)  # including interpreter start and imports
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


# ------------------------------------------------------------------------------------------ parts


def part_speed() -> dict:
    from trkit.assets import corpus_files

    files = [corpus_files()[k] for k in sorted(corpus_files())]
    size_1x = sum(f.stat().st_size for f in files)
    out: dict = {"corpus_bytes_1x": size_1x}
    with tempfile.TemporaryDirectory() as tmp:
        files_10x = []
        for f in files:
            g = Path(tmp) / f.name
            data = f.read_bytes()
            g.write_bytes(data * 10)
            files_10x.append(g)
        for scale, fs in (("1x", files), ("10x", files_10x)):
            for kind in ("ours", "hf_bpe_trainer"):
                out[f"{kind}_{scale}"] = _run_child(kind, fs)
                print(kind, scale, out[f"{kind}_{scale}"], file=sys.stderr, flush=True)
    for kind in ("ours", "hf_bpe_trainer"):
        for m in ("wall_s", "cpu_s"):
            out[f"{kind}_growth_10x_{m}"] = round(out[f"{kind}_10x"][m] / out[f"{kind}_1x"][m], 2)
    for scale in ("1x", "10x"):
        for m in ("wall_s", "cpu_s"):
            out[f"ratio_ours_over_hf_{scale}_{m}"] = round(out[f"ours_{scale}"][m] / out[f"hf_bpe_trainer_{scale}"][m], 3)
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


def part_generalization() -> dict:
    from tokenizers import Tokenizer

    from trkit import assets, tokstats, vocab

    base = vocab.load_base("qwen3")
    train, val = assets.corpus_files(), assets.validation_files()
    soft, soft_info = software_messages()
    settings = {"software-messages (all 4 sources)": (dict(train), soft)} if soft else {}
    for held in sorted(train):
        settings[f"held-out {held}"] = ({k: v for k, v in train.items() if k != held},
                                        tokstats.read_documents(train[held]) + tokstats.read_documents(val[held]))
    counts = {name: vocab.count_words(base, srcs, progress=False) for name, (srcs, _) in settings.items()}
    table: dict = {}
    for rule, params in RULES.items():
        row: dict = {}
        for name, (srcs, texts) in settings.items():
            t0 = time.perf_counter()
            learned = vocab.learn_merges(base, counts[name], N_NEW, progress=False, **params)
            secs = time.perf_counter() - t0
            ext = Tokenizer.from_str(json.dumps(vocab.extended_tokenizer_json(base, learned)))
            st = tokstats.compare(base.backend, ext, {"x": texts})["sources"]["x"]
            row[name] = {"pct_fewer": round(st["pct_fewer"], 2),
                         "pct_new_never_used": round(100 * st["new_tokens_never_used"] / len(learned.merges), 1),
                         "learn_s": round(secs, 1)}
            if name.startswith("software"):  # the full-corpus model: validation fertility and morph boundaries
                rep = tokstats.compare(base.backend, ext, {"val": assets.validation_file()}, morphology=True)
                v = rep["sources"]["val"]
                row["validation (all 4 sources)"] = {"fertility": round(v["fertility"], 4),
                                                     "pct_fewer": round(v["pct_fewer"], 2),
                                                     "morph_boundary_share": round(v["morph_boundary_share"], 4),
                                                     "base_fertility": round(v["base_fertility"], 4)}
        held = [k for k in row if k.startswith("held-out")]
        row["mean over held-out sources"] = {
            "pct_fewer": round(sum(row[k]["pct_fewer"] for k in held) / len(held), 2),
            "pct_new_never_used": round(sum(row[k]["pct_new_never_used"] for k in held) / len(held), 1)}
        table[rule] = row
        print(rule, json.dumps(row), file=sys.stderr, flush=True)
    return {"software_messages": soft_info, "rules": {k: v for k, v in RULES.items()}, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["main", "generalization"], default="main")
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
        result = {"meta": meta, "n_new_tokens": N_NEW, "speed": part_speed(), "quality": part_quality()}
        name = "vocab.json"
    else:
        result = {"meta": meta, "n_new_tokens": N_NEW, **part_generalization()}
        name = "vocab_generalization.json"
    meta["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    (RESULTS / name).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
