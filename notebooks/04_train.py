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
# # 04 · Train: teach the extended model to use its Turkish tokens
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/04_train.ipynb)
#
# Notebook 02 gave the 20,000 new tokens rows initialised from their pieces. Now we train, in two stages:
#
# 1. **rows**: only the new tokens' input and output rows move (PEFT `trainable_token_indices`); the rest of
#    the model is frozen, so the new rows learn to fit what the model already knows;
# 2. **adapters**: DoRA adapters on every projection (QLoRA on a T4: the frozen base in 4-bit) **plus** the new
#    rows, each with its own learning rate, with NEFTune noise on the input embeddings.
#
# The loss is computed from the final hidden states in chunks, so the fp32 logits of a 172k-token vocabulary
# never exist at once. Progress is measured in **bits per character** on held-out Turkish and on English (did it
# forget?), before, during and after.
#
# **If Colab disconnects**: nothing is lost. Checkpoints go to Drive every few minutes; run this notebook again
# (Runtime → Run all) and both stages continue from their newest complete checkpoint, ending with exactly the
# parameters an uninterrupted run would have. A finished stage is not trained again.
#
# Headless: `python -m trkit notebooks run 04_train --profile cpu`; the same stage on the command line:
# `python -m trkit train --model DIR --stage rows --out DIR` (see `--help`).

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
model_dir = ""            # the extended checkpoint of notebook 02 (empty: <workdir>/model-ext)
adapter = "dora"          # dora (trkit's) | peft-dora | lora
rank = 16
optimizer = "auto"        # auto (8-bit AdamW on a T4, else AdamW) | adamw | adamw8bit | sophia
neftune_alpha = 5.0       # NEFTune noise on the input embeddings during stage 2 (0: off)
lr = 2e-4                 # adapters
rows_lr = 1e-3            # new rows in stage 1
embedding_lr = 1e-4       # new rows in stage 2
rows_steps = None         # None: the profile's plan (trkit.plans)
adapter_steps = None
seq_len = None
batch_size = None
grad_accum = None
use_form = True           # show an ipywidgets form over these settings (interactive runs)
merge = False             # also write a merged full checkpoint (shard by shard)
push_to_hub = ""          # e.g. "you/qwen3-8b-tr-adapter" (needs HF_TOKEN with write access)

# %% [markdown]
# ## 1. The plan, and will it fit?
# Sizes come from the profile (a T4 trains Qwen3-8B in 4-bit with micro-batch 1 × 1024; an A100 in bf16 with
# 2 × 2048; the CPU demo trains SmolLM2-135M for a few dozen steps). The memory estimator checks the GPU before
# anything big is loaded; a setting that would not fit is refused with the largest batch and sequence that do.

# %%
from pathlib import Path

import pandas as pd

from trkit import colab, loading, memory, plans, profiles

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
model_path = Path(model_dir) if model_dir else work / "model-ext"
if not (model_path / "config.json").is_file():
    raise FileNotFoundError(f"{model_path} holds no checkpoint: run notebook 02 first (or set model_dir)")
from trkit import train

span = train.new_token_range(model_path)  # (first new id, vocabulary size) from notebook 02's manifest
if span is None:
    raise ValueError(f"{model_path} has no new-token rows: run notebook 02 (vocabulary extension) first")
sizes = plans.plan("train", prof.name, smoke=smoke, rows_steps=rows_steps, adapter_steps=adapter_steps,
                   seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum)
settings = {"adapter": adapter, "rank": rank, "optimizer": optimizer, "neftune_alpha": float(neftune_alpha),
            "lr": float(lr), "rows_lr": float(rows_lr), "embedding_lr": float(embedding_lr), **sizes}
preflight = loading.preflight(model_path, prof, batch_size=sizes["batch_size"], seq_len=sizes["seq_len"],
                              lora_rank=rank, new_tokens=span[1] - span[0], dora=adapter != "lora", optimizer=optimizer,
                              loss_chunk=1024)  # trkit train's chunked loss (its default)
t4 = memory.estimate_for_profile("Qwen/Qwen3-8B", "t4", lora_rank=16, dora=True, new_tokens=20_000,
                                 vocab_size=(151_669 + 20_000 + 63) // 64 * 64, optimizer="adamw8bit", loss_chunk=1024)
pd.DataFrame({
    "this run": {"model": str(model_path), "profile": f"{prof.name} ({prof.device}, {prof.dtype})",
                 "steps (rows + adapters)": f"{sizes['rows_steps']} + {sizes['adapter_steps']}",
                 "micro-batch x accumulation x seq": f"{sizes['batch_size']} x {sizes['grad_accum']} x {sizes['seq_len']}",
                 "estimated GPU peak (GiB)": f"{preflight['total_gib']:.2f}", "verdict": preflight["verdict"]},
    "Qwen3-8B on a free T4": {"model": "Qwen/Qwen3-8B + 20k rows, NF4", "profile": "t4 (cuda, float16)",
                              "steps (rows + adapters)": "300 + 600", "micro-batch x accumulation x seq": "1 x 16 x 1024",
                              "estimated GPU peak (GiB)": f"{t4.total / memory.GIB:.2f}", "verdict": t4.verdict("t4")["verdict"]},
})

# %%
from IPython.display import display

from trkit.progress import text_mode

if use_form and not smoke and not text_mode():  # a headless run (papermill) could not use the form
    display(colab.settings_form(settings, {"adapter": ["dora", "peft-dora", "lora"],
                                           "optimizer": ["auto", "adamw", "adamw8bit", "sophia"]},
                                title="training settings"))

# %% [markdown]
# ## 2. Before training: how does the extended model write Turkish?
# Greedy continuations of Turkish prompts. "new tokens" counts how many generated tokens are from the 20,000
# added ones: at init the model barely uses them (their output rows are deliberately cautious).

# %%
from trkit import assets, evaluation, generation

turkish_docs = evaluation.read_documents(assets.validation_file())
prompts = generation.turkish_prompts(turkish_docs, 2 if smoke else 3, words=6)
gen_settings = generation.GenerationSettings(prompts=len(prompts), max_new_tokens=8 if smoke else 24, sample=False)


def continuations(model, tok, label):
    rows = generation.generate_continuations(model, tok, prompts, gen_settings, base_size=span[0], progress=False)
    return pd.DataFrame([{"prompt": c.prompt, label: c.text, f"new tokens ({label})": f"{c.new_tokens}/{c.content_tokens}"}
                         for c in rows]).set_index("prompt")


model, tok = loading.load_model(model_path, prof)
before = continuations(model, tok, "before")
del model
before

# %% [markdown]
# ## 3. Stage 1: only the new rows
# Everything but the 20,000 input and output rows is frozen. The plot updates while it trains (in Colab).
# AdamW's `eps` for these rows is half the gradient one occurrence of a token gives its row (measured on the first
# batch): with the usual `1e-8`, Adam turns the tiny softmax push-down of each row whose token is *not* in the
# step into a full step, and every new token gets less likely with each step (on SmolLM2 + 20k, 40 steps made
# Turkish bits per character 6% worse instead of 2% better).

# %%
from trkit import curves

rows_out = work / "train-rows"
rows_cfg = train.TrainConfig(
    model=str(model_path), out=str(rows_out), stage="rows", max_steps=settings["rows_steps"],
    seq_len=settings["seq_len"], batch_size=settings["batch_size"], grad_accum=settings["grad_accum"],
    embedding_lr=settings["rows_lr"], optimizer=settings["optimizer"], profile=prof.name,
    max_documents=sizes["max_documents"] or None, eval_chars=sizes["eval_chars"], save_minutes=5, save_steps=50)
live = curves.LivePlot("rows")
rows_run = train.train(rows_cfg, on_log=live)
print(f"stage 1: {rows_run.steps} steps in {rows_run.seconds / 60:.1f} min"
      + (f" (resumed from step {rows_run.resumed_from})" if rows_run.resumed_from else ""))

# %% [markdown]
# ## 4. Stage 2: adapters plus the new rows
# Starts from stage 1's output (its rows are merged in), trains DoRA adapters on all seven projections and keeps
# training the rows at a lower learning rate.

# %%
adapters_out = work / "train-adapters"
adapters_cfg = train.TrainConfig(
    model=str(rows_out), out=str(adapters_out), stage="adapters", adapter=settings["adapter"],
    rank=settings["rank"], lr=settings["lr"], embedding_lr=settings["embedding_lr"],
    neftune_alpha=settings["neftune_alpha"], max_steps=settings["adapter_steps"], seq_len=settings["seq_len"],
    batch_size=settings["batch_size"], grad_accum=settings["grad_accum"], optimizer=settings["optimizer"],
    profile=prof.name, max_documents=sizes["max_documents"] or None, eval_chars=sizes["eval_chars"],
    save_minutes=5, save_steps=50, merge=merge, push_to_hub=push_to_hub or None)
live = curves.LivePlot("adapters", earlier={"rows": rows_run.log})
adapters_run = train.train(adapters_cfg, on_log=live)
print(f"stage 2: {adapters_run.steps} steps in {adapters_run.seconds / 60:.1f} min -> {adapters_run.adapter}")

# %% [markdown]
# ## 5. Curves
# Training loss, validation bits per character (Turkish should fall; English should stay put) and memory.

# %%
import matplotlib.pyplot as plt

curves.plot_log({"rows": curves.read_log(rows_out), "adapters": curves.read_log(adapters_out)},
                title="stage 1 (rows) then stage 2 (adapters)")
plt.show()


def bpc_table(run_dir):
    evals = [r for r in curves.read_log(run_dir) if "eval/turkish_bpc" in r]
    return {"Turkish BPC": evals[-1]["eval/turkish_bpc"], "English BPC": evals[-1]["eval/english_bpc"]} if evals else {}


first = next((r for r in curves.read_log(rows_out) if "eval/turkish_bpc" in r), {})
pd.DataFrame({"extended, at init": {"Turkish BPC": first.get("eval/turkish_bpc"), "English BPC": first.get("eval/english_bpc")},
              "after stage 1 (rows)": bpc_table(rows_out), "after stage 2 (adapters)": bpc_table(adapters_out)}).T.round(4)

# %% [markdown]
# ## 6. After training: the same prompts
# The adapter loads with plain PEFT: `PeftModel.from_pretrained(extended_model, "<out>/adapter")`. For generating,
# PEFT merges it into the weights (`merge_and_unload`: the same function, at the base model's speed); a 4-bit
# base stays unmerged.

# %%
from peft import PeftModel

model, tok = loading.load_model(model_path, prof)
model = PeftModel.from_pretrained(model, str(adapters_run.adapter)).eval()
if not getattr(model, "is_loaded_in_4bit", False):
    model = model.merge_and_unload()
after = continuations(model, tok, "after")
del model
pd.set_option("display.max_colwidth", None)
before.join(after)

# %% [markdown]
# ## 7. What was saved, and what a disconnect costs
# Each stage's directory holds `adapter/` (PEFT format, tokenizer beside it), `log.jsonl`, a model card
# `README.md` and its newest checkpoints (`checkpoint-<step>/`: adapter, optimizer state, RNG, data position;
# written under a temporary name and renamed, so a half-written one never exists). Rerunning this notebook finds
# the finished stages and does nothing; after a disconnect it resumes from the newest checkpoint.

# %%
from trkit.artifacts import read_manifest

rows_info = []
for run_dir in (rows_out, adapters_out):
    m = read_manifest(run_dir)
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    rows_info.append({"run": run_dir.name, "steps": m["steps"], "adapter": str(run_dir / "adapter"),
                      "checkpoints kept": ", ".join(ckpts), "resumed from": m.get("resumed_from")})
display(pd.DataFrame(rows_info).set_index("run"))
print((adapters_out / "README.md").read_text(encoding="utf-8"))
