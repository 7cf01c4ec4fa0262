# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Distil: let the extended model inherit what the original knew
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/03_distill.ipynb)
#
# Training only on cross-entropy teaches the new Turkish tokens, but every update can also wash out what the
# model knew (English, facts, style). **Distillation** keeps the student close to a teacher: here the *original*
# model (self-distillation into its extended self) or a bigger model of the same family (Qwen3-14B/32B share
# Qwen3-8B's tokenizer).
#
# A free T4 cannot hold a teacher beside an 8B student, so this runs in two phases:
#
# * **Phase A, the teacher pass** (once, alone: this runtime before the student exists, another Colab runtime,
#   an A100, any bigger machine): the teacher reads the training text **with its own tokenizer**, in exactly the
#   order the training stage will, and writes its top-32 next-token log-probabilities per position to Drive,
#   packed to ~137 bytes per position. Resumable: a disconnect loses at most one shard.
# * **Phase B, the student** (`trkit train --distill CACHE`): the student reads the same text with its extended
#   tokenizer. Because the extension only *merges*, every student token boundary is a teacher boundary, so each
#   student position finds the teacher position with the same text before it (same document, same byte), and
#   the student's distribution is mapped onto the teacher's vocabulary by each token's first piece. The loss is
#   `(1 - w)·CE + w·T²·KL(teacher ‖ student)`, computed in chunks like the training stage's.
#
# | runtime | phase A: Qwen3-8B teacher | positions | Drive | phase B |
# |---|---|---|---|---|
# | free T4 (NF4 teacher) | 10,000 FineWeb-2 pages: ~6 h, split over sessions (it resumes) | ~10M | ~1.4 GB | the student trains with 04's settings |
# | A100 (bf16 teacher) | 20,000 pages: ~1 h | ~20M | ~2.7 GB | same |
# | CPU demo (SmolLM2-135M) | 6 documents: measured below | ~8k | ~1 MB | 10 steps |
#
# The teacher reads windows 4× the student's sequence length with a stride of half a window, so every cached
# position has more text behind it than any student position (a student position whose teacher saw less is
# trained on cross-entropy only: `kd/masked` below). The GPU times are estimates, not measurements: 2 × 8B
# FLOPs per forward token (two per position, the windows overlap by half) at ~15 TFLOP/s effective on a T4 and
# ~150 on an A100; Drive = positions × ~137 B. The cpu row is measured in this notebook. Headless:
# `python -m trkit notebooks run 03_distill --profile cpu`; on the command line:
# `python -m trkit distill cache --teacher NAME --corpus default --seq-len 4096 --stride 2048 --out DIR` then
# `python -m trkit train --model EXTENDED --distill DIR ...`.

# %% [markdown]
# ## Install

# %%
import subprocess
import sys

TRKIT_GIT = "git+https://github.com/trkit-dev/trkit.git"
TRKIT_REF = "main"  # the tag or commit these notebooks were tested with, once one is published
if "google.colab" in sys.modules:
    from importlib.metadata import version

    before = version("transformers")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"trkit @ {TRKIT_GIT}@{TRKIT_REF}", "-r",
                    f"https://raw.githubusercontent.com/trkit-dev/trkit/{TRKIT_REF}/requirements-colab.txt"], check=True)
    if version("transformers") != before and "transformers" in sys.modules:
        print(f"transformers was upgraded ({before} -> {version('transformers')}): the runtime restarts once now. "
              "When it is back, run all cells again.")
        import os

        os.kill(os.getpid(), 9)

# %% tags=["parameters"]
profile = "auto"          # auto | cpu | t4 | a100 | gpu
workdir = ""              # empty: Drive on Colab, ./trkit-work elsewhere
smoke = False             # tiny sizes, same code path (the test suite)
teacher = "auto"          # auto: the original base model (self-distillation); or e.g. "Qwen/Qwen3-14B"
student_dir = ""          # the extended checkpoint of notebook 02 (empty: <workdir>/model-ext)
phase = "both"            # both | teacher (phase A only, e.g. on a bigger runtime) | student (phase B only)
cache_documents = None    # None: the profile's plan (trkit.plans)
top_k = None
seq_len = None           # the student's sequence length
teacher_seq_len = None   # the teacher's window (4x seq_len by default), scored with a stride of half a window
steps = None
batch_size = None
grad_accum = None
kd_weight = 0.5           # weight of the KD term; 1 - kd_weight on cross-entropy
kd_temperature = 1.0

# %% [markdown]
# ## 1. The plan: how many positions, how much Drive
# Nothing big is loaded yet: the teacher's tokenizer packs the text and the cache's size is known exactly.

# %%
from pathlib import Path

import pandas as pd

from trkit import colab, distill, plans, profiles

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
sizes = plans.plan("distill", prof.name, smoke=smoke, cache_documents=cache_documents, top_k=top_k,
                   seq_len=seq_len, teacher_seq_len=teacher_seq_len, steps=steps, batch_size=batch_size,
                   grad_accum=grad_accum)
window = dict(seq_len=sizes["teacher_seq_len"], stride=sizes["teacher_seq_len"] // 2)
teacher_name = prof.base_model if teacher == "auto" else teacher
student = Path(student_dir) if student_dir else work / "model-ext"
cache_dir = work / "distill" / "cache"
plan, _, _, _ = distill.plan_cache(teacher_name, ["default"], cache_dir, top_k=sizes["top_k"], **window,
                                   max_documents=sizes["cache_documents"], profile=prof)
print(distill.describe_plan(plan))
pd.Series({"teacher": teacher_name, "documents": plan["documents"], "positions": plan["positions"],
           "bytes per position": plan["layout"]["bytes_per_position"], "Drive (MB)": round(plan["bytes"] / 1e6, 2),
           "shards": len(plan["shards"])}, name="value").to_frame()

# %% [markdown]
# ## 2. Phase A: the teacher pass
# Rerun this cell after a disconnect: finished shards are kept (their hashes are checked), the rest is computed;
# the finished cache is byte-identical to one computed in a single go.

# %%
if phase in ("both", "teacher"):
    cache = distill.cache_teacher_logits(teacher_name, ["default"], cache_dir, top_k=sizes["top_k"], **window,
                                         max_documents=sizes["cache_documents"], profile=prof, overwrite=False)
    print(f"{cache.positions:,} positions, {cache.bytes_per_position:.1f} B/position, "
          f"{cache.positions_per_s:,.0f} positions/s ({cache.shards_computed} shard(s) computed, "
          f"{cache.shards_skipped} already there)")

# %% [markdown]
# ## 3. Phase B: the student learns from the cache
# The same training stage as notebook 04 (new rows, then adapters), with `--distill`. Only the documents the
# teacher saw are used (`max_documents`), in the same order (same seed).

# %%
from trkit import curves, train

student_out = work / "distill" / "student"
if phase in ("both", "student"):
    cfg = train.TrainConfig(
        model=str(student), out=str(student_out), stage="adapters", adapter="dora", distill=str(cache_dir),
        kd_weight=kd_weight, kd_temperature=kd_temperature, max_steps=sizes["steps"], seq_len=sizes["seq_len"],
        batch_size=sizes["batch_size"], grad_accum=sizes["grad_accum"], max_documents=sizes["cache_documents"],
        profile=prof.name, eval_chars=plans.plan("train", prof.name, smoke=smoke)["eval_chars"], save_minutes=5)
    run = train.train(cfg, on_log=curves.LivePlot("distilled student"))
    print(f"{run.steps} steps in {run.seconds / 60:.1f} min -> {run.adapter}")

# %% [markdown]
# ## 4. What the teacher term did
# `kd/kl` is the distillation term per token, `kd/ce` the cross-entropy, `kd/masked` the share of student
# positions whose teacher had seen less text (they get cross-entropy only).

# %%
import matplotlib.pyplot as plt

log = curves.read_log(student_out)
curves.plot_log({"distilled student": log}, title="student trained with the teacher cache")
plt.show()
steps_log = [r for r in log if "loss" in r]
pd.DataFrame([{k: r.get(k) for k in ("step", "loss", "kd/ce", "kd/kl", "kd/masked")} for r in steps_log]).set_index("step").tail(5)
