"""Benchmark the training stage on CPU with SmolLM2-135M + its 20k Turkish extension (real weights).

Four parts, each a JSON section of ``benchmarks/results/train.json``:

* ``loss``: ``--loss chunked`` vs ``--loss full`` at micro-batch 4 x 1024 tokens, each run in a fresh
  process (peak RSS = the process's VmHWM), interleaved chunked/full/chunked/full; step time = median
  of steps 2.. ; the first step's loss of both (same data, same initial parameters). Goals: peak <=
  0.6x, time <= 1.1x, loss equal within 1e-4.
* ``speed``: optimizer steps per second for each adapter (trkit DoRA, PEFT DoRA, LoRA) x optimizer
  (AdamW, 8-bit AdamW, SophiaG), micro-batch 4 x 256, fresh process each, ratios against LoRA+AdamW.
* ``stages``: a ``--stage rows`` run then a ``--stage adapters`` run from it on the default corpus;
  Turkish (held-out validation) and English bits per character of base SmolLM2, the extended model
  at init, after rows and after adapters, and generation as ``trkit evaluate`` measures it (greedy and
  sampled Turkish continuations: chars/s, chars per token, share of new tokens against the share in the
  tokenizer's own encoding of Turkish reference text), with ratios to the base model.
* ``eps``: ``--stage rows`` runs that differ only in the AdamW eps of the new rows (``--embedding-eps``),
  Turkish/English bits per character before and after.

Usage: ``python benchmarks/bench_train.py --model EXT_DIR [--parts loss speed stages eps]`` where EXT_DIR
is ``trkit embed``'s output for SmolLM2 (built if missing: ``--build DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import trkit.packing as P
import trkit.train as T

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024

marks = {}
_pack = P.pack
def pack(*a, **k):  # the model is loaded before the corpus is packed; reset the high-water mark after packing
    out = _pack(*a, **k)
    marks['before_training'] = hwm()
    open('/proc/self/clear_refs', 'w').write('5')  # Linux: VmHWM := current RSS
    return out
P.pack = pack  # trkit.train imports it inside train()
cfg = T.TrainConfig(**json.loads(sys.argv[1]))
run = T.train(cfg)
print('RESULT ' + json.dumps({'peak_rss_bytes': max(hwm(), marks.get('before_training', 0)),
                              'training_peak_rss_bytes': hwm(), 'before_training_peak_rss_bytes': marks.get('before_training'),
                              'log': run.log, 'seconds': run.seconds}))
"""


def run_child(config: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def step_seconds(log: list[dict], tokens_per_step: int) -> list[float]:
    return [tokens_per_step / r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]


def part_loss(model: str, work: Path, steps: int, checkpointing: bool) -> dict:
    runs = {"chunked": [], "full": []}
    for k, loss in enumerate(["chunked", "full", "chunked", "full"]):
        cfg = dict(model=model, out=str(work / f"loss-{loss}-{k}"), stage="adapters", adapter="dora", loss=loss,
                   max_steps=steps, seq_len=1024, batch_size=4, grad_accum=1, eval_chars=0, save_steps=0,
                   save_minutes=0, profile="cpu", max_documents=4000, progress=False,
                   gradient_checkpointing=checkpointing)
        r = run_child(cfg)
        runs[loss].append({"peak_rss_mb": r["peak_rss_bytes"] / 2**20,
                           "training_peak_rss_mb": r["training_peak_rss_bytes"] / 2**20,
                           "before_training_peak_rss_mb": r["before_training_peak_rss_bytes"] / 2**20,
                           "step_seconds": step_seconds(r["log"], 4096),
                           "losses": [x["loss"] for x in r["log"] if "loss" in x]})
        print(f"[loss] {loss}: peak {runs[loss][-1]['peak_rss_mb']:.0f} MB (training {runs[loss][-1]['training_peak_rss_mb']:.0f}),"
              f" steps {runs[loss][-1]['step_seconds']}", file=sys.stderr, flush=True)
    # loss equality in fp32 (in bf16 the two paths round the logits differently, ~4e-5 relative)
    exact = {}
    for loss in ("chunked", "full"):
        cfg = dict(model=model, out=str(work / f"loss-fp32-{loss}"), stage="adapters", adapter="dora", loss=loss,
                   max_steps=1, seq_len=1024, batch_size=4, grad_accum=1, eval_chars=0, save_steps=0, save_minutes=0,
                   profile="cpu", max_documents=4000, progress=False, gradient_checkpointing=checkpointing,
                   dtype="float32")
        exact[loss] = run_child(cfg)["log"][-1]["loss"]
    peak = {k: min(x["peak_rss_mb"] for x in v) for k, v in runs.items()}
    train_peak = {k: min(x["training_peak_rss_mb"] for x in v) for k, v in runs.items()}
    times = {k: statistics.median([s for x in v for s in x["step_seconds"]]) for k, v in runs.items()}
    first = {k: v[0]["losses"][0] for k, v in runs.items()}
    return {"setting": f"SmolLM2-135M + 20k rows, trkit DoRA r=16, micro-batch 4 x 1024, bf16 autocast, "
                       f"gradient checkpointing {'on' if checkpointing else 'off'}, {steps} steps per run; "
                       "training peak = RSS high-water mark reset after the model is loaded and the corpus packed",
            "runs": runs, "peak_rss_mb": peak, "training_peak_rss_mb": train_peak, "median_step_seconds": times,
            "peak_ratio": peak["chunked"] / peak["full"],
            "training_peak_ratio": train_peak["chunked"] / train_peak["full"],
            "time_ratio": times["chunked"] / times["full"],
            "first_step_loss_bf16": first, "first_step_loss_bf16_abs_diff": abs(first["chunked"] - first["full"]),
            "first_step_loss_fp32": exact, "first_step_loss_fp32_abs_diff": abs(exact["chunked"] - exact["full"]),
            "goals": {"peak_ratio_max": 0.6, "time_ratio_max": 1.1, "loss_abs_diff_max": 1e-4}}


def part_speed(model: str, work: Path, steps: int) -> dict:
    rows = []
    for adapter in ("dora", "peft-dora", "lora"):
        for optimizer in ("adamw", "adamw8bit", "sophia"):
            cfg = dict(model=model, out=str(work / f"speed-{adapter}-{optimizer}"), stage="adapters", adapter=adapter,
                       optimizer=optimizer, max_steps=steps, seq_len=256, batch_size=4, eval_chars=0, save_steps=0,
                       save_minutes=0, profile="cpu", max_documents=2000, progress=False, hessian_every=2)
            r = run_child(cfg)
            secs = step_seconds(r["log"], 1024)
            rows.append({"adapter": adapter, "optimizer": optimizer, "median_step_seconds": statistics.median(secs),
                         "steps_per_s": 1 / statistics.median(secs), "step_seconds": secs,
                         "peak_rss_mb": r["peak_rss_bytes"] / 2**20})
            print(f"[speed] {adapter} {optimizer}: {rows[-1]['steps_per_s']:.3f} steps/s", file=sys.stderr, flush=True)
    ref = next(r for r in rows if r["adapter"] == "lora" and r["optimizer"] == "adamw")["steps_per_s"]
    for r in rows:
        r["vs_lora_adamw"] = r["steps_per_s"] / ref
    table = ["| adapter | AdamW | 8-bit AdamW | SophiaG (GNB every 2 steps) |", "|---|---:|---:|---:|"]
    for adapter in ("dora", "peft-dora", "lora"):
        cells = [f"{r['steps_per_s']:.3f} ({r['vs_lora_adamw']:.2f}x)" for r in rows if r["adapter"] == adapter]
        table.append(f"| {adapter} | " + " | ".join(cells) + " |")
    return {"setting": "SmolLM2-135M + 20k rows, r=16 on all seven projections + new rows, micro-batch 4 x 256, "
                       f"bf16 autocast, {steps} steps per run (median of steps 2..)", "rows": rows,
            "table_markdown": "\n".join(table)}


def part_eps(model: str, work: Path, steps: int, batch: int, seq: int, eval_chars: int, lr: float = 1e-3,
             eps_values=(1e-8, 1e-5, 1e-4, 1e-3, 1e-2, None)) -> dict:
    """``--stage rows`` for ``steps`` steps with each AdamW eps of the new rows (None = trkit's default,
    half the gradient of one occurrence); Turkish / English BPC before and after, same data and seed."""
    from trkit.train import CONFIG_NAME, TrainConfig, train

    rows = []
    for eps in eps_values:
        out = work / f"eps-{eps}"
        run = train(TrainConfig(model=model, out=str(out), stage="rows", max_steps=steps, batch_size=batch,
                                seq_len=seq, embedding_lr=lr, embedding_eps=eps, eval_chars=eval_chars, save_steps=0,
                                save_minutes=0, profile="cpu", progress=False))
        evals = [r for r in run.log if "eval/turkish_bpc" in r]
        used = json.loads((out / CONFIG_NAME).read_text())["optimizer_groups"][0]["eps"]
        rows.append({"eps": eps, "eps_used": used, "turkish_bpc_before": evals[0]["eval/turkish_bpc"],
                     "turkish_bpc_after": evals[-1]["eval/turkish_bpc"], "english_bpc_before": evals[0]["eval/english_bpc"],
                     "english_bpc_after": evals[-1]["eval/english_bpc"],
                     "turkish_change_pct": 100 * (evals[-1]["eval/turkish_bpc"] / evals[0]["eval/turkish_bpc"] - 1),
                     "minutes": run.seconds / 60})
        print(f"[eps] {eps} (used {used:.3g}): Turkish {rows[-1]['turkish_bpc_before']:.4f} -> "
              f"{rows[-1]['turkish_bpc_after']:.4f}", file=sys.stderr, flush=True)
    return {"setting": f"--stage rows, {steps} steps x {batch} x {seq}, lr {lr:g}, bf16 where the CPU has it; BPC on "
                       f"{eval_chars} chars of Turkish validation and English text (the training stage's own eval)",
            "rows": rows}


GENERATION_KEYS = ("chars_per_s", "tokens_per_s", "chars_per_token", "new_token_share", "reference_new_token_share",
                   "turkish_share", "turkish_continuations", "continuations", "stopped_early")


def part_stages(model: str, work: Path, rows_steps: int, adapter_steps: int, eval_chars: int, batch: int,
                seq: int, prompts_n: int = 10, new_tokens: int = 48, rows_lr: float = 1e-3, lr: float = 2e-4) -> dict:
    """rows, then adapters from them; every model scored on the same texts and prompts as ``trkit evaluate``
    scores them (generation: greedy and sampled continuations, speed over the Turkish ones)."""
    import torch
    from peft import PeftModel

    from trkit import assets, generation
    from trkit.evaluation import read_documents, score_documents
    from trkit.loading import load_model, load_tokenizer
    from trkit.report import sample_documents
    from trkit.train import TrainConfig, new_token_range, train

    turkish = sample_documents(read_documents(assets.validation_file()), eval_chars)
    english = sample_documents(read_documents(assets.english_file()), eval_chars)
    reference = read_documents(assets.validation_file())
    prompts = generation.turkish_prompts(reference, prompts_n, words=8)
    gen = generation.GenerationSettings(prompts=prompts_n, max_new_tokens=new_tokens, sample=True)
    t0 = time.perf_counter()
    rows_run = train(TrainConfig(model=model, out=str(work / "rows"), stage="rows", max_steps=rows_steps,
                                 batch_size=batch, seq_len=seq, embedding_lr=rows_lr, eval_chars=0, save_steps=0,
                                 save_minutes=0, profile="cpu", progress=False))
    t_rows = time.perf_counter() - t0
    adapters_run = train(TrainConfig(model=str(work / "rows"), out=str(work / "adapters"), stage="adapters",
                                     adapter="dora", lr=lr, max_steps=adapter_steps, batch_size=batch, seq_len=seq,
                                     eval_chars=0, save_steps=0, save_minutes=0, profile="cpu", neftune_alpha=5,
                                     progress=False))
    t_adapters = time.perf_counter() - t0 - t_rows
    results = {}
    for label, path, adapter, base_tok in (("base SmolLM2", "smollm2", None, None),
                                           ("extended, at init", model, None, "smollm2"),
                                           ("after rows", model, rows_run.adapter, "smollm2"),
                                           ("after adapters", model, adapters_run.adapter, "smollm2")):
        m, tok = load_model(path, "cpu")
        if adapter is not None:
            m = PeftModel.from_pretrained(m, str(adapter)).merge_and_unload().eval()  # as trkit.report does
        with torch.inference_mode():
            tr = score_documents(m, tok, turkish, progress=False)
            en = score_documents(m, tok, english, progress=False)
        g = generation.measure(m, tok, prompts, reference, gen,
                               base_tokenizer=None if base_tok is None else load_tokenizer(base_tok),
                               progress=False)
        results[label] = {"turkish_bpc": tr.bits_per_char, "english_bpc": en.bits_per_char,
                          "turkish_tokens": tr.tokens, "english_tokens": en.tokens,
                          "generation": {k: g.get(k) for k in GENERATION_KEYS},
                          "generation_by_mode": {mode: {k: v.get(k) for k in GENERATION_KEYS}
                                                 for mode, v in g["modes"].items()},
                          "samples": [{"prompt": s["prompt"], "mode": s["mode"], "text": s["text"],
                                       "new_tokens": s["new_tokens"], "tokens": s["content_tokens"]}
                                      for s in g.get("samples", [])][:6]}
        print(f"[stages] {label}: {results[label]['turkish_bpc']:.4f} / {results[label]['english_bpc']:.4f}, "
              f"generation {results[label]['generation']}", file=sys.stderr, flush=True)
        del m
    base = results["base SmolLM2"]
    for r in results.values():
        r["turkish_vs_base"] = r["turkish_bpc"] / base["turkish_bpc"]
        r["english_change_pct"] = 100 * (r["english_bpc"] / base["english_bpc"] - 1)
        g, gb = r["generation"], base["generation"]
        r["generation_vs_base"] = {
            "chars_per_s": g["chars_per_s"] / gb["chars_per_s"] if g["chars_per_s"] and gb["chars_per_s"] else None,
            "chars_per_token": g["chars_per_token"] / gb["chars_per_token"] if g["chars_per_token"] and gb["chars_per_token"] else None,
            "new_token_share_vs_reference": (g["new_token_share"] / g["reference_new_token_share"]
                                             if g["new_token_share"] is not None and g["reference_new_token_share"] else None)}
    return {"setting": f"rows {rows_steps} steps (lr {rows_lr:g}) then trkit DoRA r=16 + rows {adapter_steps} steps "
                       f"(lr {lr:g}, rows lr/2, NEFTune 5), micro-batch {batch} x {seq}, default corpus, bf16 where the CPU "
                       f"has it; Turkish = {eval_chars} chars of the validation split and English = {eval_chars} chars "
                       f"(trkit.report.sample_documents); generation = trkit.generation.measure on {prompts_n} Turkish "
                       f"prompts x {new_tokens} tokens, greedy + sampled (T 0.8, top-p 0.95), speed over Turkish "
                       "continuations",
            "minutes": {"rows": t_rows / 60, "adapters": t_adapters / 60}, "models": results,
            "goals": {"turkish_vs_base_max": 0.9, "english_change_pct_max": 2.0, "chars_per_s_vs_base_min": 1.3,
                      "chars_per_token_vs_base_min": 1.6, "new_token_share_vs_reference_min": 0.8}}


def build(out: Path) -> str:
    from trkit.cli import main

    if not (out / "model-ext" / "config.json").is_file():
        assert main(["vocab", "--base", "smollm2", "--corpus", "default", "--new-tokens", "20000", "--out",
                     str(out / "vocab"), "--quiet", "--overwrite"]) == 0
        assert main(["embed", "--model", "smollm2", "--tokenizer", str(out / "vocab"), "--out", str(out / "model-ext"),
                     "--quiet", "--save-dtype", "bfloat16"]) == 0
    return str(out / "model-ext")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="SmolLM2 extended checkpoint (trkit embed output)")
    ap.add_argument("--build", help="build the extension here when --model is not given")
    ap.add_argument("--parts", nargs="+", default=["loss", "speed", "stages"], choices=["loss", "speed", "stages", "eps"])
    ap.add_argument("--loss-steps", type=int, default=4)
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--rows-steps", type=int, default=300)
    ap.add_argument("--adapter-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-chars", type=int, default=30_000)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rows-lr", type=float, default=1e-3)
    ap.add_argument("--eps-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args(argv)
    model = args.model or build(Path(args.build or tempfile.mkdtemp(prefix="bench-train-")))
    work = Path(tempfile.mkdtemp(prefix="bench-train-runs-"))
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update({"model": model, "machine": f"{os.cpu_count()} CPU cores (shared): read ratios, not seconds",
                   "date": time.strftime("%Y-%m-%d")})
    from trkit.artifacts import atomic_write_json

    def save(part: str, value: dict) -> None:  # each part keeps the date and model it was measured on
        result[part] = {**value, "date": time.strftime("%Y-%m-%d"), "model": model}
        atomic_write_json(out_path, result)

    if "loss" in args.parts:
        save("loss", part_loss(model, work, args.loss_steps, args.checkpointing == "on"))
    if "speed" in args.parts:
        save("speed", part_speed(model, work, args.speed_steps))
    if "stages" in args.parts:
        save("stages", part_stages(model, work, args.rows_steps, args.adapter_steps, args.eval_chars, args.batch,
                                   args.seq, args.prompts, args.new_tokens, args.rows_lr, args.lr))
    if "eps" in args.parts:
        save("eps", part_eps(model, work, args.eps_steps, args.batch, args.seq, min(args.eval_chars, 6000),
                             args.rows_lr))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1, default=str)[:6000])
    return result


if __name__ == "__main__":
    main()
