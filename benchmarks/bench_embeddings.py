"""Stage 2 benchmark: SmolLM2-135M + a 20k-token Turkish extension of its own tokenizer.

Measures, in one run on the same machine:
  * Turkish validation and English bits per character of the base model, and of the extended model
    at init with fvt / mean / random (the same rule for input and output rows, tied as the base)
    and with trkit's default (fvt inputs, fvt_offset outputs, untied), with and without fvt_offset's base
    rows' split (the base pieces' share that merged tokens took, in Turkish contexts);
  * the same after training only the new rows (input + output) on the Turkish training split;
  * peak RSS of checkpoint surgery vs loading the model whole (each in its own subprocess).

Usage: .venv/bin/python benchmarks/bench_embeddings.py [--train-minutes 10] [--out benchmarks/results/embeddings.json]
Prints one JSON object and writes it to --out. The 2-core machine is shared with other jobs: compare
ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_RSS_SNIPPET = {
    # the surgery with precomputed statistics (the CLI's path after calibration, or with --offset-stats)
    "surgery": (
        "from trkit import embeddings as e; "
        "s = e.OffsetStats.load({stats!r}); "
        "e.extend_checkpoint({src!r}, {ext!r}, {out!r}, output_init='fvt_offset', offsets=s, progress=False)"
    ),
    # the peer: load the model whole, extend it in memory, save it
    "in_memory": (
        "import torch; from transformers import AutoModelForCausalLM; from trkit import embeddings as e; "
        "s = e.OffsetStats.load({stats!r}); "
        "m = AutoModelForCausalLM.from_pretrained({src!r}); "
        "e.extend_model(m, {ext!r}, output_init='fvt_offset', offsets=s); "
        "m.save_pretrained({out!r})"
    ),
    # loading alone, every weight touched (transformers maps safetensors lazily)
    "load_whole": (
        "import torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained({src!r}); "
        "print(sum(float(p.float().sum()) for p in m.parameters()))"
    ),
    "imports_only": "import torch, transformers, safetensors, trkit.embeddings",
}


def peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter; its peak resident set size in MB.

    Read from ``VmHWM`` in /proc/self/status (the high-water mark of the child's own address space).
    Not ``ru_maxrss``: Linux keeps that across execve, so a child would report its parent's peak.
    """
    wrapper = code + (
        "\nimport re; print('PEAK', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK")][-1]
    return int(line.split()[1]) / 1024


def measure_rss(src, ext_dir, work, tok_base, tok_ext) -> dict:
    """Peak RSS of checkpoint surgery vs loading the model whole, each in a fresh subprocess.

    The surgery gets precomputed offset statistics (what the CLI does after its calibration pass, or
    what ``--offset-stats`` reuses), so only the surgery itself is measured.
    """
    import torch

    from trkit import embeddings as emb

    ext = emb.load_extension(ext_dir)
    torch.manual_seed(0)
    stats = emb.OffsetStats(torch.randn(576) * 0.01, -torch.rand(len(ext.new_ids)) * 6, 0.5)
    stats_path = work / "rss-stats.json"
    stats.save(stats_path)
    surgery = peak_rss_mb(PEAK_RSS_SNIPPET["surgery"].format(stats=str(stats_path), src=str(src), ext=str(ext_dir),
                                                             out=str(work / "rss-surgery-out")))
    in_memory = peak_rss_mb(PEAK_RSS_SNIPPET["in_memory"].format(stats=str(stats_path), src=str(src),
                                                                 ext=str(ext_dir), out=str(work / "rss-memory-out")))
    whole = peak_rss_mb(PEAK_RSS_SNIPPET["load_whole"].format(src=str(src)))
    imports = peak_rss_mb(PEAK_RSS_SNIPPET["imports_only"])
    matrix_mb = ext.rows(49152) * 576 * 4 / 2**20
    return {
        "checkpoint_surgery": surgery, "in_memory_extend_and_save": in_memory, "load_whole_touched": whole,
        "imports_only": imports,
        "ratio_surgery_vs_in_memory": surgery / in_memory,
        "ratio_surgery_vs_load_whole": surgery / whole,
        "ratio_above_imports_surgery_vs_in_memory": (surgery - imports) / (in_memory - imports),
        "new_matrix_mb_fp32": matrix_mb,
        "checkpoint_file_mb": (Path(src) / "model.safetensors").stat().st_size / 2**20,
        "note": "VmHWM of a fresh interpreter per measurement; fp32 checkpoint; the tied model is untied by "
                f"fvt_offset, so the surgery writes two {matrix_mb:.0f} MB matrices, one at a time",
    }


def bpc_pair(model, tok, turkish, english, batch_size):
    from trkit.evaluation import score_documents

    tr = score_documents(model, tok, turkish, batch_size=batch_size, progress=False)
    en = score_documents(model, tok, english, batch_size=batch_size, progress=False)
    return {"turkish": tr.to_dict(), "english": en.to_dict()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/embeddings.json")
    ap.add_argument("--ext", help="reuse an extension dir (default: learn 20k tokens on the default corpus)")
    ap.add_argument("--new-tokens", type=int, default=20000)
    ap.add_argument("--english-docs", type=int, default=20, help="first N documents of the English file")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", nargs="*", default=["fvt", "mean", "random"])
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--holdout", nargs="*", default=[], choices=["web", "wiki", "ataturk", "kenet"],
                    help="sources left out of vocabulary learning, calibration and training; Turkish BPC is then "
                         "measured on their validation split only (an unseen register)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trkit import assets
    from trkit import embeddings as emb
    from trkit.evaluation import read_documents
    from trkit.vocab import extend_tokenizer

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    src = assets.smollm2_dir()
    t0 = time.perf_counter()
    ext_dir = Path(args.ext) if args.ext else work / "ext"
    learn_on = sorted(set(assets.corpus_files()) - set(args.holdout))
    if not args.ext:
        corpus = "default" if not args.holdout else {k: assets.corpus_files()[k] for k in learn_on}
        extend_tokenizer("smollm2", corpus, n_new_tokens=args.new_tokens, out_dir=ext_dir, progress=False)
    ext = emb.load_extension(ext_dir)
    tok_base = AutoTokenizer.from_pretrained(src)
    tok_ext = AutoTokenizer.from_pretrained(ext_dir)
    turkish = ([d for k in args.holdout for d in read_documents(assets.validation_files()[k])] if args.holdout
               else read_documents(assets.validation_file()))
    english = read_documents(assets.english_file())[: args.english_docs]
    cal_tr, cal_en, train_docs = emb.default_calibration_text(sources=learn_on)
    result: dict = {
        "model": "SmolLM2-135M-Instruct (dequantised Q4_1, trkit.assets.smollm2_dir)",
        "extension": {"base_vocab_size": ext.base_vocab_size, "new_tokens": len(ext.new_ids), "rows": ext.rows(49152)},
        "dtype": args.dtype,
        "holdout_sources": args.holdout,
        "texts": {"turkish": (f"validation split of the held-out sources {args.holdout} (the vocabulary, calibration "
                              "and training never saw these sources)") if args.holdout else
                             "trkit.assets.validation_file() (pooled validation split, one doc per line)",
                  "english": f"first {args.english_docs} docs of trkit.assets.english_file()",
                  "calibration": "source-balanced 40 KB of the Turkish training split + last 12 KB of the English file",
                  "turkish_chars": sum(map(len, turkish)), "english_chars": sum(map(len, english))},
        "machine": "2 shared CPU cores (other jobs running): compare ratios, not seconds",
    }

    def fresh():
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()

    rows: dict[str, dict] = {}

    def save_partial():
        from trkit.artifacts import atomic_write_json

        atomic_write_json(Path(args.out).with_suffix(".partial.json"), {**result, "details": rows})

    if not args.skip_rss:
        result["peak_rss_mb"] = measure_rss(src, ext_dir, work, tok_base, tok_ext)
        print(f"peak RSS: {result['peak_rss_mb']}", file=sys.stderr, flush=True)
    base = bpc_pair(fresh(), tok_base, turkish, english, args.batch_size)
    rows["base"] = base
    for method in args.methods:
        m = emb.extend_model(fresh(), ext, init=method, output_init=method, base_tokenizer=src)
        rows[method] = bpc_pair(m, tok_ext, turkish, english, args.batch_size)
        del m
        print(f"[{time.perf_counter() - t0:6.0f}s] {method}: {rows[method]['turkish']['bits_per_char']:.4f}",
              file=sys.stderr, flush=True)
        save_partial()
    model = fresh()
    t_cal = time.perf_counter()
    stats = emb.estimate_offset_stats(model, ext, tok_base, tok_ext, cal_tr, cal_en, count_documents=train_docs)
    result["calibration_seconds"] = time.perf_counter() - t_cal
    result["offset_stats"] = {"scale": stats.scale, **stats.report}
    # the new rows' offsets alone (base rows as the base model has them), then the default with the base rows' split
    import dataclasses

    only_new = emb.extend_model(fresh(), ext, init="fvt", output_init="fvt_offset",
                                offsets=dataclasses.replace(stats, base_scale=0.0))
    rows["fvt+fvt_offset, new rows only"] = bpc_pair(only_new, tok_ext, turkish, english, args.batch_size)
    del only_new
    emb.extend_model(model, ext, init="fvt", output_init="fvt_offset", offsets=stats)
    stats_path = work / emb.OFFSET_STATS_NAME
    stats.save(stats_path)
    rows["fvt+fvt_offset"] = bpc_pair(model, tok_ext, turkish, english, args.batch_size)
    print(f"[{time.perf_counter() - t0:6.0f}s] fvt_offset: {rows['fvt+fvt_offset']['turkish']['bits_per_char']:.4f}",
          file=sys.stderr, flush=True)

    # train only the new rows on the Turkish training split, with the training stage (trkit.train)
    if args.train_steps > 0:
        from peft import PeftModel

        from trkit.train import TrainConfig, train

        ext_ckpt = work / "model-ext"
        emb.extend_checkpoint(src, ext, ext_ckpt, init="fvt", output_init="fvt_offset", offsets=stats, progress=False)
        t_train = time.perf_counter()
        run = train(TrainConfig(model=str(ext_ckpt), out=str(work / "rows"), stage="rows",
                                corpus=[str(assets.corpus_files()[k]) for k in learn_on], max_steps=args.train_steps,
                                batch_size=args.train_batch, seq_len=args.train_seq, embedding_lr=args.lr,
                                eval_chars=0, save_steps=0, save_minutes=0, profile="cpu", dtype=args.dtype,
                                progress=False))
        history = [r for r in run.log if "loss" in r]
        result["training"] = {"steps": run.steps, "batch": args.train_batch, "seq_len": args.train_seq,
                              "lr": args.lr, "tokens": run.steps * args.train_batch * args.train_seq,
                              "minutes": (time.perf_counter() - t_train) / 60,
                              "history": [{"step": r["step"], "loss": r["loss"]} for r in history],
                              "trainable": "new rows only (input + output): python -m trkit train --stage rows"}
        print(f"[{time.perf_counter() - t0:6.0f}s] trained {run.steps} steps", file=sys.stderr, flush=True)
        save_partial()
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ext_ckpt, dtype=dtype),
                                            str(run.adapter)).merge_and_unload().eval()
        rows["fvt+fvt_offset, trained"] = bpc_pair(trained, tok_ext, turkish, english, args.batch_size)
        del trained
    del model

    b_tr = base["turkish"]["bits_per_char"]
    b_en = base["english"]["bits_per_char"]
    result["bpc"] = {
        name: {"turkish": r["turkish"]["bits_per_char"], "english": r["english"]["bits_per_char"],
               "turkish_vs_base": r["turkish"]["bits_per_char"] / b_tr,
               "english_change_pct": 100 * (r["english"]["bits_per_char"] / b_en - 1),
               "turkish_tokens": r["turkish"]["tokens"], "english_tokens": r["english"]["tokens"]}
        for name, r in rows.items()
    }
    ext_row = rows.get("fvt", rows["fvt+fvt_offset"])  # every extended row reads the text in the same tokens
    result["turkish_tokens_fewer_pct"] = 100 * (1 - ext_row["turkish"]["tokens"] / base["turkish"]["tokens"])
    result["details"] = rows

    result["total_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from trkit.artifacts import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
    return result


if __name__ == "__main__":
    main()
