"""Sizes per hardware profile for each notebook step: what the demo runs on CPU, what a T4 or an A100 runs.

Every notebook's parameters cell leaves its sizes at ``None`` ("the plan's value") and calls
:func:`plan`, so one table decides them all: the ``cpu`` column is the offline demo (real
SmolLM2-135M, every notebook together aimed at 20 minutes on a 2-core machine; measured 24.6 minutes
on one without native bf16, where it runs fp32), ``smoke`` the test
suite's run of the same code paths with tiny sizes, ``t4`` a free Colab (Qwen3-8B in 4-bit, 15 GB),
``a100`` Colab Pro or any 40/80 GB card. A value passed to the notebook (papermill ``-p``) wins.
The README's Colab plans are these numbers.
"""

from __future__ import annotations

from typing import Any

# step -> setting -> {profile: value}; "gpu" falls back to "t4", a missing profile to "cpu"
PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "vocab": {
        "new_tokens": {"smoke": 2_000, "cpu": 20_000, "t4": 20_000, "a100": 20_000},
        "hub_documents": {"smoke": 200, "cpu": 0, "t4": 50_000, "a100": 200_000},
        "corpus_documents": {"smoke": 600, "cpu": 0, "t4": 0, "a100": 0},  # per local source; 0 = all
    },
    "embeddings": {
        "eval_chars": {"smoke": 3_000, "cpu": 6_000, "t4": 100_000, "a100": 200_000},
        "calibration_chars": {"smoke": 4_000, "cpu": 6_000, "t4": 40_000, "a100": 40_000},
        "count_documents": {"smoke": 3_000, "cpu": 15_000, "t4": 0, "a100": 0},  # training documents counted; 0 = all
    },
    "distill": {
        # documents of the training stream the teacher reads (in the training order); the cpu demo's 6 are ~8k
        # teacher positions (SmolLM2 tokens), about one pass of its 10 student steps of 4 x 128 extended tokens
        "cache_documents": {"smoke": 6, "cpu": 6, "t4": 10_000, "a100": 20_000},
        "top_k": {"smoke": 8, "cpu": 32, "t4": 32, "a100": 32},
        "seq_len": {"smoke": 64, "cpu": 128, "t4": 1024, "a100": 2048},
        # teacher windows: 4x the student's sequence, scored with a stride of half a window, so every cached
        # position has seen >= 2x seq_len teacher tokens of history, more text than any student block holds
        # (the extension cuts tokens ~1.7x); fewer would leave student positions masked (CE only)
        "teacher_seq_len": {"smoke": 256, "cpu": 512, "t4": 4096, "a100": 8192},
        "steps": {"smoke": 3, "cpu": 10, "t4": 400, "a100": 1000},
        "batch_size": {"smoke": 2, "cpu": 4, "t4": 1, "a100": 2},
        "grad_accum": {"smoke": 1, "cpu": 1, "t4": 16, "a100": 16},
    },
    "train": {
        "rows_steps": {"smoke": 3, "cpu": 12, "t4": 300, "a100": 500},
        "adapter_steps": {"smoke": 3, "cpu": 10, "t4": 600, "a100": 1500},
        "seq_len": {"smoke": 64, "cpu": 256, "t4": 1024, "a100": 2048},
        "batch_size": {"smoke": 2, "cpu": 4, "t4": 1, "a100": 2},
        "grad_accum": {"smoke": 1, "cpu": 1, "t4": 16, "a100": 16},
        "max_documents": {"smoke": 300, "cpu": 0, "t4": 100_000, "a100": 400_000},
        "eval_chars": {"smoke": 1_000, "cpu": 3_000, "t4": 50_000, "a100": 100_000},
    },
    # notebook 05 takes its real sizes from trkit.report.PROFILE_SIZES; these are only the smoke test's
    "eval": {
        "turkish_chars": {"smoke": 2_000, "cpu": 20_000, "t4": 100_000, "a100": 200_000},
        "english_chars": {"smoke": 1_000, "cpu": 10_000, "t4": 50_000, "a100": 100_000},
        "prompts": {"smoke": 2, "cpu": 5, "t4": 20, "a100": 20},
        "max_new_tokens": {"smoke": 8, "cpu": 48, "t4": 128, "a100": 128},
        "morph_items": {"smoke": 40, "cpu": 0, "t4": 0, "a100": 0},  # 0 = all 1,836 items
    },
}


def plan(step: str, profile: str, smoke: bool = False, **given: Any) -> dict[str, Any]:
    """The sizes of ``step`` on ``profile`` (``smoke`` for the test run); ``given`` values that are not
    None win. Unknown steps or settings are errors (a typo must not silently fall back)."""
    if step not in PLANS:
        raise ValueError(f"unknown plan step {step!r}; one of {', '.join(PLANS)}")
    unknown = set(given) - set(PLANS[step])
    if unknown:
        raise ValueError(f"unknown {step} setting(s) {sorted(unknown)}; known: {sorted(PLANS[step])}")
    column = "smoke" if smoke else ({"gpu": "t4"}.get(profile, profile))
    out = {}
    for name, values in PLANS[step].items():
        value = given.get(name)
        out[name] = value if value is not None else values.get(column, values["cpu"])
    return out
