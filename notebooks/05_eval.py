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
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Evaluate: better at Turkish, cheaper to run, and did it forget English?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/05_eval.ipynb)
#
# One report for every model the earlier notebooks produced: the base model, the extended model at init
# (notebook 02), the distilled student (03) and the trained model (04). All of them see the same texts, prompts
# and benchmark items:
#
# * **tokenizer**: tokens per Turkish / English word, and how many fewer than the base tokenizer;
# * **bits per character** on held-out Turkish and on English: the only loss that compares two vocabularies
#   honestly (per-token perplexity cannot), and the forgetting check;
# * **generation**: Turkish continuations, characters per second, characters per generated token, how often the
#   model actually writes with its new tokens, whether it stays in Turkish, vowel harmony of what it writes;
# * **TurkMorfBench**: a Turkish morphology benchmark (vowel harmony, consonant alternation, case and
#   possessive suffixes, on real and nonce stems) with its published leaderboard for context;
# * on a GPU with `lm_eval` installed, Turkish lm-evaluation-harness tasks (Belebele, XCOPA, XNLI, Global-MMLU).
#
# Headless: `python -m trkit notebooks run 05_eval --profile cpu`; the same on the command line:
# `python -m trkit evaluate --model A --model B --adapter DIR --out DIR`.

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
profile = "auto"        # auto | cpu | t4 | a100 | gpu
workdir = ""            # empty: Drive on Colab, ./trkit-work elsewhere
report_dir = ""         # empty: <workdir>/report (`trkit notebooks run` puts it at <out>/report)
smoke = False           # tiny sizes, same code path (the test suite)
base_model = "auto"     # auto: the profile's base model (cpu: SmolLM2-135M, GPU: Qwen/Qwen3-8B)
turkish_chars = None    # None: the profile's sizes (trkit.report.PROFILE_SIZES)
english_chars = None
prompts = None
max_new_tokens = None
morph_items = None      # TurkMorfBench items (0: all 1,836)
lm_eval = True          # GPU profiles: also the lm-evaluation-harness tasks when lm_eval is installed
model_cards = True      # put the tables in each evaluated training run's model card (RUN/README.md, RUN/adapter/README.md)

# %% [markdown]
# ## 1. The models to compare
# Whatever the earlier notebooks left in the work directory; a missing one is skipped.

# %%
from pathlib import Path

import pandas as pd

from trkit import colab, plans, profiles, report

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
base = prof.base_model if base_model == "auto" else base_model
candidates = [
    report.ModelSpec(base, label="base"),
    report.ModelSpec(str(work / "model-ext"), label="extended (init)"),
    report.ModelSpec(str(work / "model-ext"), adapter=str(work / "distill" / "student" / "adapter"), label="distilled"),
    report.ModelSpec(str(work / "model-ext"), adapter=str(work / "train-adapters" / "adapter"), label="trained"),
]


def present(spec):
    return (spec.adapter is None or Path(spec.adapter, "adapter_config.json").is_file()) and (
        spec.label == "base" or Path(spec.model, "config.json").is_file())


specs = [s for s in candidates if present(s)]
pd.DataFrame([{"label": s.label, "model": s.model, "adapter": s.adapter or "-", "found": present(s)}
              for s in candidates]).set_index("label")

# %% [markdown]
# ## 2. Measure
# One model in memory at a time (Qwen3-8B in 4-bit on a T4). On the cpu profile the sizes are small so the demo
# stays short; the report states the sizes it used.

# %%
overrides = dict(turkish_chars=turkish_chars, english_chars=english_chars, prompts=prompts,
                 max_new_tokens=max_new_tokens, morph_items=morph_items)
if smoke:
    overrides = {**plans.plan("eval", prof.name, smoke=True), **{k: v for k, v in overrides.items() if v is not None}}
if not lm_eval:
    overrides["tasks"] = ()
out_dir = Path(report_dir) if report_dir else work / "report"
result = report.evaluate_models(specs, out_dir, prof, overwrite=True,
                                **{k: v for k, v in overrides.items() if v is not None})
print(f"{len(specs)} models in {result['seconds'] / 60:.1f} min -> {out_dir}")
if model_cards:
    for run in report.add_to_model_cards(result):
        print(f"tables added to the model card of {run}")

# %% [markdown]
# ## 3. The tables
# The same Markdown is in `report/report.md` and, with `model_cards`, in each training run's model card
# (`README.md` in the run and beside the adapter, the card that travels with the adapter to the hub).

# %%
from IPython.display import Markdown, display

display(Markdown(report.markdown_tables(result)))

# %% [markdown]
# ## 4. The plots

# %%
for plot in (report.plot_bpc, report.plot_tokens_per_word, report.plot_speed, report.plot_turkmorfbench):
    display(plot(result))

# %% [markdown]
# ## 5. Side by side: what each model writes
# Greedy continuations of the same Turkish prompts (the first ones of the report).

# %%
pd.set_option("display.max_colwidth", None)
side = {}
for m in result["models"]:
    for s in m["generation"].get("samples", []):
        if s["mode"] == "greedy":
            side.setdefault(s["prompt"], {})[m["label"]] = " ".join(s["text"].split())
pd.DataFrame(side).T.rename_axis("prompt").head(3)

# %% [markdown]
# ## 6. Where it is
# `report.json` holds every number for scripts, `report.md` the tables, the PNG files the plots.

# %%
sorted(p.name for p in out_dir.iterdir())
