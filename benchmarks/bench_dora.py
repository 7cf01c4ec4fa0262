"""One forward+backward of a single DoRA layer at Qwen3-8B shapes: trkit vs PEFT DoRA vs PEFT LoRA.

Cases: 4096→4096 (q/o_proj) and 4096→12288 (gate/up_proj), r=16, alpha=32, 512 tokens, for an fp32
nn.Linear base and a bitsandbytes NF4 (double-quantised) base. All three methods get the same base
weights and the same A, B (B non-zero) and m, and the benchmark checks that trkit's and PEFT's DoRA
outputs agree before it times anything. The input requires grad (as a layer inside a model does).

Time: the three methods are run round-robin in one process (so a busy machine slows them alike);
per method the median and the minimum (best of N: noise only ever adds time) of ``--repeats``
steps are reported, and per pair the median over rounds of the within-round ratio ("paired"),
which is what the goals are checked on: the load of a shared machine changes during a run, and
the three steps of one round run back to back under the same load.

Peak memory, the extra bytes a step needs above what is live before it (weights, input, output
gradient):
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (same process).
* CPU, measured twice in a fresh subprocess per case (one warm-up step first):
  - ``peak_alloc``: every allocation and free of torch's CPU allocator during the step, from the
    profiler's memory events (``profile_memory=True``), summed in time order; the maximum of the
    running sum. This sees all torch tensors (bitsandbytes' CPU kernels allocate through torch) but
    not memory a C library mallocs on its own. tracemalloc would see none of this (Python heap only).
  - ``peak_rss``: the process's resident-set high-water mark (VmHWM, reset by writing 5 to
    /proc/self/clear_refs) minus its RSS before the step. glibc is started with
    MALLOC_MMAP_THRESHOLD_=65536 so that every large block is mmapped and returned on free, and
    malloc_trim runs before the step; otherwise freed heap memory would be reused unseen.

Usage:  python benchmarks/bench_dora.py [--device auto|cpu|cuda] [--repeats N]
Prints one JSON object and writes it to benchmarks/results/dora.json (dora_cuda.json on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

METHODS = ("trkit_dora", "peft_dora", "peft_lora")
GOALS = {"peak_vs_peft_dora": 0.6, "time_vs_peft_dora": 0.8, "time_vs_peft_lora": 1.2}
RESULTS = Path(__file__).resolve().parent / "results"


class Box(nn.Module):
    """A one-layer model so PEFT and trkit can target the layer by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def build_base(in_f: int, out_f: int, base: str, device: str) -> Box:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False)
    if base == "fp32":
        return Box(dense.to(device))
    import bitsandbytes as bnb

    # QLoRA on a GPU: a bf16 checkpoint quantised to NF4, bf16 compute; on CPU everything stays fp32
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to(device)
    layer.support_avx512bf16_for_cpu = False  # bitsandbytes CPU trap (shared/OFFLINE.md)
    box = Box(layer)
    box.is_loaded_in_4bit = True  # how PEFT recognises a 4-bit model
    return box


def input_dtype(base: str, device: str) -> torch.dtype:
    return torch.bfloat16 if (base == "nf4" and device == "cuda") else torch.float32


def wrap(method: str, box: Box, r: int, alpha: float) -> nn.Module:
    if method == "trkit_dora":
        from trkit.dora import apply_dora

        return apply_dora(box, ["proj"], r=r, alpha=alpha)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_dora=method == "peft_dora")
    return get_peft_model(box, config)


def adapter_tensors(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    if method == "trkit_dora":
        layer = model.proj
        return {"A": layer.lora_A.weight, "B": layer.lora_B.weight, "m": layer.lora_magnitude_vector}
    layer = model.base_model.model.proj
    out = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
    if method == "peft_dora":
        out["m"] = layer.lora_magnitude_vector["default"].weight
    return out


def build_case(shape: tuple[int, int], base: str, method: str, device: str, r: int, alpha: float, tokens: int):
    """(model, x, grad_out) with seeded, method-independent adapter values."""
    in_f, out_f = shape
    model = wrap(method, build_base(in_f, out_f, base, device), r, alpha)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        params = adapter_tensors(model, method)
        params["A"].copy_(torch.empty(r, in_f).uniform_(-1, 1, generator=gen) / in_f**0.5)
        params["B"].copy_(torch.randn(out_f, r, generator=gen) * 0.02)
        m_noise = torch.randn(out_f, generator=gen)  # drawn for every method so x and g are the same
        if "m" in params:
            params["m"].mul_(1 + 0.05 * m_noise.to(device))
    dtype = input_dtype(base, device)
    x = torch.randn(1, tokens, in_f, generator=gen).to(device, dtype).requires_grad_(True)
    g = torch.randn(1, tokens, out_f, generator=gen).to(device, dtype)
    return model, x, g


def clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    x.grad = None


def step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    model(x).backward(g)


# --------------------------------------------------------------------------- CPU memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_bytes(fn) -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss0 = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    fn()
    return (_proc_status_kib("VmHWM") - rss0) * 1024


def peak_alloc_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_memory_cpu(case: dict) -> dict:
    """Runs in a fresh subprocess: warm-up step, then the RSS and the allocator measurements."""
    torch.set_num_threads(case["threads"])
    model, x, g = build_case(tuple(case["shape"]), case["base"], case["method"], "cpu", case["r"], case["alpha"], case["tokens"])
    step(model, x, g)  # warm-up: lazy initialisation, thread pools
    clear_grads(model, x)
    rss = peak_rss_bytes(lambda: step(model, x, g))
    clear_grads(model, x)
    alloc = peak_alloc_bytes(lambda: step(model, x, g))
    return {"peak_rss_bytes": rss, "peak_alloc_bytes": alloc}


def memory_cpu_subprocess(case: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--_memory-case", json.dumps(case)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {case}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory_cuda(model, x, g) -> dict:
    clear_grads(model, x)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(model, x, g)
    torch.cuda.synchronize()
    return {"peak_alloc_bytes": torch.cuda.max_memory_allocated() - before}


# --------------------------------------------------------------------------- main
def run(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bases = args.bases.split(",")
    repeats = args.repeats or (20 if device == "cuda" else 5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    load_start = os.getloadavg()
    cases, ratios = [], []
    for shape in shapes:
        for base in bases:
            built = {m: build_case(shape, base, m, device, args.rank, args.alpha, args.tokens) for m in METHODS}
            # same A, B, m => trkit and PEFT DoRA must agree before we time them
            with torch.no_grad():
                y_t = built["trkit_dora"][0](built["trkit_dora"][1])
                y_p = built["peft_dora"][0](built["peft_dora"][1])
                max_abs_diff = (y_t.float() - y_p.float()).abs().max().item()
                rel = max_abs_diff / y_p.float().abs().max().item()
            del y_t, y_p
            for m in METHODS:  # warm-up
                for _ in range(2 if device == "cuda" else 1):
                    clear_grads(built[m][0], built[m][1])
                    step(*built[m])
            times = {m: [] for m in METHODS}
            for _ in range(repeats):
                for m in METHODS:
                    model, x, g = built[m]
                    clear_grads(model, x)
                    sync()
                    t0 = time.perf_counter()
                    step(model, x, g)
                    sync()
                    times[m].append(time.perf_counter() - t0)
            memory = {}
            for m in METHODS:
                if device == "cuda":
                    memory[m] = measure_memory_cuda(*built[m])
            del built
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            else:
                for m in METHODS:
                    memory[m] = memory_cpu_subprocess(
                        {"shape": shape, "base": base, "method": m, "r": args.rank, "alpha": args.alpha, "tokens": args.tokens, "threads": torch.get_num_threads()}
                    )
            row = {}
            for m in METHODS:
                case = {
                    "shape": f"{shape[0]}x{shape[1]}",
                    "base": base,
                    "method": m,
                    "time_s_median": statistics.median(times[m]),
                    "time_s_min": min(times[m]),
                    "time_s_all": [round(t, 4) for t in times[m]],
                    **memory[m],
                }
                cases.append(case)
                row[m] = case
                print(f"{case['shape']:>10} {base:>4} {m:>10}  {case['time_s_median']:.4f} s  "
                      + "  ".join(f"{k}={v / 2**20:.1f} MiB" for k, v in memory[m].items()), file=sys.stderr)
            t, pd, pl = row["trkit_dora"], row["peft_dora"], row["peft_lora"]
            ratio = {
                "shape": t["shape"],
                "base": base,
                "trkit_vs_peft_dora_output_max_abs_diff": max_abs_diff,
                "trkit_vs_peft_dora_output_rel_diff": rel,
                "time_vs_peft_dora": t["time_s_median"] / pd["time_s_median"],
                "time_vs_peft_lora": t["time_s_median"] / pl["time_s_median"],
                # best of N: on a shared machine noise only adds time, so the minimum is the steadier estimate
                "time_min_vs_peft_dora": t["time_s_min"] / pd["time_s_min"],
                "time_min_vs_peft_lora": t["time_s_min"] / pl["time_s_min"],
                # median over rounds of the ratio within a round (the three ran back to back, under the same load)
                "time_paired_vs_peft_dora": statistics.median(a / b for a, b in zip(times["trkit_dora"], times["peft_dora"])),
                "time_paired_vs_peft_lora": statistics.median(a / b for a, b in zip(times["trkit_dora"], times["peft_lora"])),
                "peak_vs_peft_dora": t["peak_alloc_bytes"] / pd["peak_alloc_bytes"],
                "peak_vs_peft_lora": t["peak_alloc_bytes"] / pl["peak_alloc_bytes"],
            }
            if "peak_rss_bytes" in t:
                ratio["peak_rss_vs_peft_dora"] = t["peak_rss_bytes"] / pd["peak_rss_bytes"]
                ratio["peak_rss_vs_peft_lora"] = t["peak_rss_bytes"] / pl["peak_rss_bytes"]
            # time goals judged on the paired ratios (robust to the load changing during the run)
            ratio["goals_met"] = {k: ratio[k.replace("time_", "time_paired_")] <= v for k, v in GOALS.items()}
            ratios.append(ratio)
    import peft

    return {
        "benchmark": "dora",
        "command": "python benchmarks/bench_dora.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "machine_shared": "other jobs may run beside this one; the three methods are timed round-robin in one process",
        "load_avg_start": [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "settings": {"tokens": args.tokens, "r": args.rank, "alpha": args.alpha, "repeats": repeats, "input_requires_grad": True,
                     "nf4_compute_dtype": "bfloat16" if device == "cuda" else "float32"},
        "memory_method": "cuda max_memory_allocated" if device == "cuda" else "profiler allocator trace (peak_alloc) and VmHWM-RSS (peak_rss), fresh subprocess per case",
        "goals": GOALS,
        "ratios": ratios,
        "cases": cases,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per method (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--shapes", default="4096x4096,4096x12288", help="comma-separated INxOUT")
    parser.add_argument("--bases", default="fp32,nf4", help="comma-separated subset of fp32,nf4")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/dora.json, dora_cuda.json on CUDA)")
    parser.add_argument("--_memory-case", dest="memory_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        print(json.dumps(measure_memory_cpu(json.loads(args.memory_case))))
        return 0
    if not set(args.bases.split(",")) <= {"fp32", "nf4"}:
        parser.error("--bases takes fp32 and/or nf4")
    result = run(args)
    device_is_cuda = result["device"] and not result["device"].startswith("cpu")
    out = Path(args.out) if args.out else RESULTS / ("dora_cuda.json" if device_is_cuda else "dora.json")
    from trkit.artifacts import atomic_write_json

    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
