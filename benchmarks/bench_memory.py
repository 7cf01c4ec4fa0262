"""The memory estimator's table for Qwen3 on T4 / A100, and its activation model checked against autograd on CPU.

1. ``table``: :func:`trkit.memory.estimate_training_memory` for Qwen3-8B, 4B and 1.7B with the
   defaults of trkit's ``t4`` profile (NF4 + double quant, fp16, batch 1 x 1024, gradient
   checkpointing) and ``a100`` profile (bf16 base, batch 8 x 2048, checkpointing), LoRA r=16 on all
   seven projections, for AdamW, 8-bit AdamW and SophiaG; plus the T4 setting with 20,000 trainable
   new-token rows (a Turkish vocabulary extension). The README's table comes from here.
2. ``activation_check``: for several small Qwen3 / Llama configs (HF modelling + PEFT LoRA, bf16
   autocast, SDPA) the bytes autograd really keeps per decoder layer (``saved_tensors_hooks``,
   distinct storages) against the estimator's activation model: the ratio should be 1.
3. ``logits_check``: the peak of transformers' fp32 loss over bf16 logits (forward + backward) on
   CPU, measured as process RSS by the monitor, against the estimator's 12 bytes x tokens x vocab.

Not done here (needs a CUDA GPU): measured CUDA peaks of Qwen3-8B-shaped random-weight models
against the predicted totals (goal: within +-15 %).

    .venv/bin/python benchmarks/bench_memory.py     # about 20 s on CPU

Prints one JSON object and writes it to benchmarks/results/memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B")
GPU_NAMES = ("t4", "a100-40", "a100-80")


def table_rows() -> list[dict]:
    from trkit.memory import estimate_for_profile

    rows = []
    settings = [("t4", {}), ("a100", {}), ("t4", {"new_tokens": 20000, "vocab_size": 151936 + 20000})]
    for model in MODELS:
        for profile, extra in settings:
            for optimizer in ("adamw", "adamw8bit", "sophiag"):
                if extra and optimizer != "adamw":
                    continue
                est = estimate_for_profile(model, profile, optimizer=optimizer, **extra)
                row = {"model": model, "profile": profile, "optimizer": optimizer, **{k: est.settings[k] for k in (
                    "weights", "batch_size", "seq_len", "new_tokens", "vocab_size")},
                       "breakdown_gib": {k: round(v / 2**30, 3) for k, v in est.breakdown.items()},
                       "total_gib": round(est.total / 2**30, 2), "verdicts": {}}
                for v in est.verdicts(GPU_NAMES):
                    row["verdicts"][v["gpu"]] = {"verdict": v["verdict"], "free_gib": round(v["free_gib"], 2),
                                                 "max_seq_len": v["max_seq_len"], "max_batch": v["max_batch"]}
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | setting | optimizer | weights | logits | activations | total GiB | T4 15 GiB | A100 40 GiB | A100 80 GiB |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        b = r["breakdown_gib"]
        setting = f"{r['weights']}, {r['batch_size']}x{r['seq_len']}" + (f", +{r['new_tokens']} rows" if r["new_tokens"] else "")
        cells = []
        for g in GPU_NAMES:
            v = r["verdicts"][g]
            cells.append(f"{v['verdict']} (seq<={v['max_seq_len']}, batch<={v['max_batch']})")
        lines.append(f"| {r['model'].split('/')[-1]} | {setting} | {r['optimizer']} | {b['weights']:.2f} | {b['logits']:.2f} | "
                     f"{b['activations']:.2f} | {r['total_gib']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def saved_bytes(model, ids) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def activation_check() -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from trkit.memory import ALL_TARGETS, lora_parameters, model_shape, saved_activation_bytes_per_token

    cases = [
        ("qwen3", dict(hidden_size=128, intermediate_size=384, num_attention_heads=8, num_key_value_heads=2, head_dim=32), 16, ALL_TARGETS),
        ("qwen3", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=64), 8, ("q_proj", "v_proj")),
        ("llama", dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=3, head_dim=32), 8, ALL_TARGETS),
    ]
    out = []
    batch, seq = 2, 64
    for model_type, dims, rank, targets in cases:
        cls = Qwen3Config if model_type == "qwen3" else LlamaConfig
        per = {}
        for layers in (1, 2):
            config = cls(vocab_size=1000, num_hidden_layers=layers, attn_implementation="sdpa", **dims)
            torch.manual_seed(0)
            model = get_peft_model(AutoModelForCausalLM.from_config(config).to(torch.bfloat16),
                                   LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))).train()
            ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
            per[layers] = saved_bytes(model, ids)
        shape = model_shape(config.to_dict())
        lora_layer = lora_parameters(shape, rank, targets)["lora"] // shape.num_hidden_layers
        predicted = saved_activation_bytes_per_token(shape, rank, targets) * batch * seq + 2 * lora_layer
        measured = per[2] - per[1]
        out.append({"model_type": model_type, **dims, "lora_rank": rank, "targets": list(targets), "tokens": batch * seq,
                    "measured_bytes_per_layer": measured, "predicted_bytes_per_layer": predicted,
                    "ratio": measured / predicted})
    return out


def logits_check(tokens: int = 1024, vocab: int = 151936) -> dict:
    """Peak RSS of transformers' causal-LM loss over bf16 logits and its backward, per token and vocabulary entry."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from trkit.memory import MemoryMonitor

    hidden = torch.randn(1, tokens, 64, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(vocab, 64, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    monitor = MemoryMonitor(interval=0.002)
    with monitor, monitor.phase("loss") as phase:
        logits = hidden @ head.T
        loss = ForCausalLMLoss(logits, labels, vocab_size=vocab)
        del logits
        loss.backward()
    measured = (phase.peak_rss - phase.rss_start) / (tokens * vocab)
    return {"tokens": tokens, "vocab": vocab, "measured_bytes_per_token_per_vocab": measured, "predicted": 12,
            "ratio": measured / 12, "how": "CPU, process RSS sampled every 2 ms by trkit.memory.MemoryMonitor"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    from trkit.artifacts import atomic_write_json

    rows = table_rows()
    result = {
        "benchmark": "memory",
        "note": "estimates from configs (no weights); LoRA r=16 on q,k,v,o,gate,up,down; not yet compared with measured "
                "CUDA peaks (no GPU in this run)",
        "table": rows,
        "table_markdown": markdown([r for r in rows if r["optimizer"] == "adamw"]),
        "activation_check": activation_check(),
        "logits_check": logits_check(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
