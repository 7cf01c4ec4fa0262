"""Stage 3 benchmark: self-distillation of SmolLM2-135M into its 20k-token Turkish extension, vs cross-entropy only.

Measures, in one run on the same machine:
  * the teacher cache (original SmolLM2 over the training text, its own tokenizer): stored positions per
    second on CPU, bytes per position at k = 32 (goal <= 140), and a cache whose writer was SIGKILLed and
    rerun compared byte for byte with an uninterrupted one (a smaller plan, same code path);
  * two training runs of the extended student on the same Turkish training text, same steps, seed, data
    order and settings: cross-entropy only, and cross-entropy + KD from the cache (--distill);
  * Turkish (validation split) and English bits per character of the base model, the student at init and
    both trained students (trkit.evaluation.score_documents). Goal: the KD run's English drift (vs the base
    model) is at most half the CE run's, at equal or better Turkish BPC.

Usage: .venv/bin/python benchmarks/bench_distill.py --student /tmp/smol/model-ext [--steps 60] [--out ...]
(without --student the extension is built with `trkit vocab` + `trkit embed` into --work). Prints one JSON
object and writes it to --out. The 2-core machine is shared: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def build_student(work: Path) -> str:
    from trkit.cli import main

    if not (work / "model-ext" / "config.json").is_file():
        assert main(["vocab", "--base", "smollm2", "--corpus", "default", "--new-tokens", "20000", "--out",
                     str(work / "vocab"), "--quiet", "--overwrite"]) == 0
        assert main(["embed", "--model", "smollm2", "--tokenizer", str(work / "vocab"), "--out",
                     str(work / "model-ext"), "--quiet"]) == 0
    return str(work / "model-ext")


def sample(docs: list[str], chars: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        if n >= chars:
            break
        out.append(d)
        n += len(d)
    return out


def files(d: Path) -> dict[str, str]:
    from trkit.artifacts import sha256_file

    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "trkit_manifest.json"}


def resume_check(text: Path, work: Path, args) -> dict:
    """The same small plan twice: uninterrupted (in this process) and SIGKILLed after its first shard, rerun."""
    from trkit import distill

    common = dict(top_k=args.top_k, seq_len=args.teacher_seq_len, stride=args.stride, profile="cpu",
                  shard_positions=args.resume_shard_positions)
    ref = distill.cache_teacher_logits("smollm2", [str(text)], work / "resume-ref", progress=False, **common)
    cli = [sys.executable, "-m", "trkit", "distill", "cache", "--teacher", "smollm2", "--corpus", str(text),
           "--top-k", str(args.top_k), "--seq-len", str(args.teacher_seq_len), "--stride", str(args.stride),
           "--profile", "cpu", "--shard-positions", str(args.resume_shard_positions), "--quiet",
           "--out", str(work / "resume-killed")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cli, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    shards = work / "resume-killed" / distill.SHARD_DIR
    while not (shards.is_dir() and list(shards.glob("*.json"))):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_complete = (work / "resume-killed" / "trkit_manifest.json").is_file()
    done_at_kill = len(list(shards.glob("*.json")))
    rerun = subprocess.run([*cli, "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    if rerun.returncode != 0:
        raise RuntimeError(rerun.stderr)
    report = json.loads(rerun.stdout)
    same = files(work / "resume-ref") == files(work / "resume-killed")
    return {"positions": ref.positions, "shards": len(ref.plan["shards"]), "shards_done_when_killed": done_at_kill,
            "complete_when_killed": killed_complete, "rerun_shards_skipped": report["shards_skipped"],
            "rerun_shards_computed": report["shards_computed"], "byte_identical": same,
            "compared": "every file of the cache except trkit_manifest.json (whose 'created' time differs)"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", help="SmolLM2 + 20k extension (trkit embed output); default: build into --work")
    ap.add_argument("--work", help="work directory (default: a new temporary one)")
    ap.add_argument("--out", default="benchmarks/results/distill.json")
    ap.add_argument("--documents", type=int, default=3000, help="training documents (the start of the default "
                    "training split in the seed-0 stream order)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stage", default="adapters", choices=["rows", "adapters"])
    ap.add_argument("--adapter", default="dora")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embedding-lr", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--teacher-seq-len", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--kd-mode", default="rest")
    ap.add_argument("--kd-chain-weight", type=float, default=0.0)
    ap.add_argument("--turkish-chars", type=int, default=40_000, help="characters of the Turkish validation split")
    ap.add_argument("--english-chars", type=int, default=60_000, help="characters of the English file")
    ap.add_argument("--resume-documents", type=int, default=300, help="documents of the kill/resume check's plan")
    ap.add_argument("--resume-shard-positions", type=int, default=4096)
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (here: 1; on a 2-core machine shared with other jobs, "
                    "2 OpenMP threads wait for each other at every op and run ~6x slower)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the kill/resume subprocesses too

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel

    from trkit import assets, distill
    from trkit.evaluation import read_documents, score_documents
    from trkit.loading import load_model
    from trkit.packing import document_stream
    from trkit.train import TrainConfig, train

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    student = args.student or build_student(work)
    t_all = time.perf_counter()
    docs = document_stream("default", seed=0).texts[: args.documents]
    text = work / "train.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    result: dict = {
        "model": "SmolLM2-135M-Instruct (dequantised Q4_1, trkit.assets.smollm2_dir) as teacher; student = it + "
                 f"20k Turkish tokens ({student})",
        "machine": "2 shared CPU cores (other jobs running), bf16: compare ratios, not seconds",
        "training_text": {"documents": len(docs), "chars": sum(map(len, docs)),
                          "source": "first documents of the default training split in seed-0 order"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "torch_threads": torch.get_num_threads(),
    }

    # 1. the teacher cache
    cache_dir = work / "cache"
    r = distill.cache_teacher_logits("smollm2", [str(text)], cache_dir, top_k=args.top_k, seq_len=args.teacher_seq_len,
                                     stride=args.stride, profile="cpu", progress=False)
    result["cache"] = {"positions": r.positions, "computed_positions": r.computed_positions, "seconds": r.seconds,
                       "positions_per_s": r.positions_per_s,
                       "forward_tokens_per_s": r.plan["forward_tokens"] / r.seconds if r.computed_positions else None,
                       "bytes": r.bytes, "bytes_per_position": r.bytes_per_position,
                       "record_layout": r.plan["layout"], "dtype": r.plan["dtype"],
                       "int32_ids_plus_fp16_logprobs_bytes_per_position": args.top_k * 6,
                       "goal_bytes_per_position_max": 140}
    print(f"[distill] cache: {r.positions:,} positions, {r.bytes_per_position:.1f} B/position, "
          f"{r.positions_per_s:.0f} positions/s", file=sys.stderr, flush=True)
    if not args.skip_resume:
        result["cache_resume"] = resume_check(_small(text, work, args.resume_documents), work, args)
        print(f"[distill] resume: {result['cache_resume']}", file=sys.stderr, flush=True)

    # 2. CE only vs CE + KD, same everything else
    common = dict(model=student, corpus=[str(text)], stage=args.stage, adapter=args.adapter, max_steps=args.steps,
                  batch_size=args.batch, seq_len=args.seq_len, grad_accum=1, lr=args.lr, embedding_lr=args.embedding_lr,
                  seed=0, eval_chars=0, save_steps=0, save_minutes=0, profile="cpu", progress=False)
    runs = {}
    for name, extra in (("ce", {}), ("kd", dict(distill=str(cache_dir), kd_weight=args.kd_weight,
                                                kd_temperature=args.kd_temperature, kd_mode=args.kd_mode,
                                                kd_chain_weight=args.kd_chain_weight))):
        t0 = time.perf_counter()
        run = train(TrainConfig(out=str(work / f"run-{name}"), overwrite=True, **common, **extra))
        losses = [x for x in run.log if "loss" in x]
        runs[name] = {"adapter": str(run.adapter), "minutes": (time.perf_counter() - t0) / 60,
                      "first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"],
                      "tokens_per_s": sum(x["tokens_per_s"] for x in losses) / len(losses)}
        if name == "kd":
            runs[name].update({k: sum(x[k] for x in losses) / len(losses) for k in ("kd/kl", "kd/ce", "kd/masked")})
        print(f"[distill] run {name}: {runs[name]}", file=sys.stderr, flush=True)

    # 3. bits per character
    turkish = sample(read_documents(assets.validation_file()), args.turkish_chars)
    english = sample(read_documents(assets.english_file()), args.english_chars)
    models = {}
    for label, path, adapter in (("base", "smollm2", None), ("student at init", student, None),
                                 ("CE only", student, runs["ce"]["adapter"]), ("CE + KD", student, runs["kd"]["adapter"])):
        m, tok = load_model(path, "cpu")
        if adapter is not None:
            m = PeftModel.from_pretrained(m, adapter).eval()
        with torch.inference_mode():
            tr = score_documents(m, tok, turkish, progress=False)
            en = score_documents(m, tok, english, progress=False)
        models[label] = {"turkish_bpc": tr.bits_per_char, "english_bpc": en.bits_per_char}
        print(f"[distill] {label}: {models[label]}", file=sys.stderr, flush=True)
        del m
    base = models["base"]
    for row in models.values():
        row["english_drift_vs_base"] = row["english_bpc"] - base["english_bpc"]
        row["english_change_pct"] = 100 * (row["english_bpc"] / base["english_bpc"] - 1)
        row["turkish_vs_base"] = row["turkish_bpc"] / base["turkish_bpc"]
    ce, kd = models["CE only"], models["CE + KD"]
    ratio = kd["english_drift_vs_base"] / ce["english_drift_vs_base"] if ce["english_drift_vs_base"] else None
    result.update({
        "runs": runs, "models": models,
        "texts": {"turkish_chars": sum(map(len, turkish)), "english_chars": sum(map(len, english)),
                  "turkish": "start of trkit.assets.validation_file()", "english": "start of trkit.assets.english_file()"},
        "kd_vs_ce": {"english_drift_ratio": ratio, "turkish_bpc_difference": kd["turkish_bpc"] - ce["turkish_bpc"]},
        "goals": {"english_drift_ratio_max": 0.5, "turkish_bpc_difference_max": 0.0,
                  "met": bool(ratio is not None and ratio <= 0.5 and kd["turkish_bpc"] <= ce["turkish_bpc"]),
                  "bytes_per_position_met": result["cache"]["bytes_per_position"] <= 140},
        "minutes_total": (time.perf_counter() - t_all) / 60,
    })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


def _small(text: Path, work: Path, n: int) -> Path:
    small = work / "resume.txt"
    small.write_text("\n".join(text.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return small


if __name__ == "__main__":
    main()
