"""TurkMorfBench: trkit's batched forced choice vs the package's own ``turkmorfbench olc``, same model, same dtype.

Measures, in one run on the same machine, for one model (default SmolLM2-135M, the offline asset):
  * trkit (:func:`trkit.morphbench.evaluate`): accuracy overall / real / nonce / per bucket, wall time;
  * the package itself: its pinned wheel (``trkit.assets.fetch_package("turkmorfbench")``, sha256
    checked) installed into a temporary directory (it declares no dependencies) and run as
    ``python -m turkmorfbench olc --model DIR --dtype bfloat16 --kip secim --tokenizer-kapat``
    (forced choice only, its primary mode; ``--en-fazla N`` for a subset: the same seeded items that
    ``trkit.morphbench.select_items`` picks), wall time;
  * the difference in points (goal: within 1) and the speed ratio package / trkit.

Wall and CPU seconds are both recorded, with the load average before and after each side. Both sides
run with the same number of torch threads (``--threads``, default 1: on a 2-core machine
shared with other jobs, OpenMP threads that spin-wait for a busy core make a forward several times
slower, for both sides alike).

Usage: .venv/bin/python benchmarks/bench_morphbench.py [--items 0] [--out benchmarks/results/morphbench.json]
Prints one JSON object and writes it to --out.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_trkit(model_dir: str, dtype: str, items: int, batch_size: int) -> dict:
    from trkit import morphbench
    from trkit.loading import load_model

    model, tok = load_model(model_dir, "cpu", dtype=dtype)
    load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    summary = morphbench.evaluate(model, tok, n_items=items, batch_size=batch_size, progress=False)
    summary["seconds"] = time.perf_counter() - t0
    summary["cpu_seconds"] = time.process_time() - c0
    summary["load_average"] = [load0, os.getloadavg()[0]]
    return summary


def run_package(model_dir: str, dtype: str, items: int, threads: int) -> dict:
    from trkit import assets

    wheel = assets.fetch_package("turkmorfbench")
    with tempfile.TemporaryDirectory(prefix="tmb-") as tmp:
        site, out = Path(tmp) / "site", Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                        str(wheel)], check=True, capture_output=True)
        cmd = [sys.executable, "-m", "turkmorfbench", "olc", "--model", model_dir, "--dtype", dtype, "--kip", "secim",
               "--tokenizer-kapat", "--cikti", str(out)] + (["--en-fazla", str(items)] if items else [])
        env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": str(threads)}
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)  # model loading included
        if proc.returncode != 0:
            raise RuntimeError(f"turkmorfbench olc failed ({proc.returncode}): {proc.stderr[-2000:]}")
        kesit = json.loads(out.read_text(encoding="utf-8"))["rapor"]["kesit"]

    def frac(key):
        return kesit[key][2] / 100 if key in kesit else None

    return {
        "command": " ".join(["turkmorfbench"] + cmd[3:]).replace(str(out), "result.json"),
        "accuracy": frac("TOPLAM"), "real": frac("gerçek gövde"), "nonce": frac("uydurma gövde"),
        "items": kesit["TOPLAM"][1], "correct": kesit["TOPLAM"][0],
        "buckets": {k[len("kova: "):]: {"accuracy": v[2] / 100, "items": v[1]} for k, v in kesit.items()
                    if k.startswith("kova: ")},
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_average": [load0, os.getloadavg()[0]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model dir or offline alias (default: smollm2)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--items", type=int, default=0, help="0 = the whole core set (1,836 items)")
    ap.add_argument("--batch-size", type=int, default=32, help="trkit's batch (sequences per forward)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--out", default="benchmarks/results/morphbench.json")
    args = ap.parse_args()

    import torch

    from trkit.loading import resolve

    torch.set_num_threads(args.threads)
    model_dir = str(resolve(args.model))
    trkit_side = run_trkit(model_dir, args.dtype, args.items, args.batch_size)
    package_side = run_package(model_dir, args.dtype, args.items, args.threads)
    diff = {k: None if trkit_side[k] is None or package_side[k] is None else round(100 * (trkit_side[k] - package_side[k]), 6)
            for k in ("accuracy", "real", "nonce")}
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "items": trkit_side["items"],
        "threads": args.threads,
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end): "
                   "compare ratios, not seconds",
        "trkit": {k: trkit_side[k] for k in ("accuracy", "real", "nonce", "items", "correct", "interval95", "buckets",
                                              "errors", "seconds", "cpu_seconds", "load_average")},
        "package": package_side,
        "difference_points": diff,
        "within_1_point": abs(diff["accuracy"]) <= 1.0,
        "speedup_trkit_vs_package": package_side["seconds"] / trkit_side["seconds"],
        # CPU time is less sensitive than wall time to other jobs on a shared machine (the package's includes
        # its interpreter start and model load, a few seconds)
        "cpu_speedup_trkit_vs_package": package_side["cpu_seconds"] / trkit_side["cpu_seconds"],
        "note": "the package takes the log-softmax in the model dtype, trkit in float32 (trkit.morphbench docstring)",
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
