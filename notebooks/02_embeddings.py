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
# # 02 · Embeddings: give the new tokens rows the model can use
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/02_embeddings.ipynb)
#
# Notebook 01 taught the tokenizer 20,000 Turkish tokens. The model has no rows for them yet. Here we
# resize the embeddings (input rows and output rows, padded to a multiple of 64) and initialise every new
# row from what the model already knows:
#
# * **input rows: FVT** — a new token is the concatenation of base tokens (its merge tree), so its row
#   starts as the mean of theirs;
# * **output rows: `fvt_offset`** — the same mean, lowered by how unlikely the merged continuation is, so a
#   merged token does not start as likely as its pieces and does not steal probability in English; and the
#   **base** pieces give up, in Turkish contexts, the share of their probability that now belongs to the merged
#   tokens starting with them (Qwen3's ` gele` rarely stands alone in the extended text: ` gelecek` took its place).
#
# The big model is never loaded for the surgery itself: the checkpoint is edited shard by shard, so
# Qwen3-8B (16 GB) fits a free Colab's 12.7 GB of RAM. We then compare the base and the extended model in
# **bits per character** (per-token perplexity cannot compare two vocabularies) on Turkish and English.
#
# Headless: `python -m trkit notebooks run 02_embeddings --profile cpu`.

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
profile = "auto"            # auto | cpu | t4 | a100 | gpu
workdir = ""                # empty: Drive on Colab, ./trkit-work elsewhere
smoke = False               # tiny sizes, same code path (the test suite)
base_model = "auto"         # auto: the profile's model (GPU: Qwen/Qwen3-8B, cpu: SmolLM2-135M); or a dir / hub name
vocab_dir = ""              # the tokenizer from notebook 01 (empty: <workdir>/vocab, learned now if missing)
init = "fvt"                # input rows: fvt | mean | random
output_init = "fvt_offset"  # output rows: fvt_offset | fvt | first | mean | random
eval_chars = None           # characters of Turkish validation / English text to score (None: the profile's plan)
calibration_chars = None    # Turkish calibration characters for fvt_offset (training split, never validation)
model_out = ""              # where the extended checkpoint goes (empty: <workdir>/model-ext). A free Drive holds
                            # 15 GB: for Qwen3-8B point this at local disk (/content/...) and copy what you need.

# %% [markdown]
# ## 1. Base model and extended tokenizer
# The vocabulary extension records the fingerprint of the tokenizer it was learned on; the surgery refuses
# a checkpoint whose tokenizer is a different one.

# %%
import json
from pathlib import Path

import pandas as pd

from trkit import colab, embeddings, loading, plans, profiles, vocab
from trkit.checkpoints import resolve_checkpoint

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
sizes = plans.plan("embeddings", prof.name, smoke=smoke, eval_chars=eval_chars, calibration_chars=calibration_chars)
model_name = prof.base_model if base_model == "auto" else base_model
src = resolve_checkpoint(model_name)  # offline alias, local dir, or hub snapshot
vdir = Path(vocab_dir) if vocab_dir else work / "vocab"
if not (vdir / "trkit_manifest.json").exists():
    new_tokens = plans.plan("vocab", prof.name, smoke=smoke)["new_tokens"]
    print(f"no vocabulary at {vdir}: learning {new_tokens} tokens on the default corpus")
    vocab.extend_tokenizer(str(src), "default", new_tokens, vdir, overwrite=True)
ext = embeddings.load_extension(vdir)
embeddings.check_tokenizer_pair(ext, src)
base_tok, ext_tok = loading.load_tokenizer(src), loading.load_tokenizer(vdir)
old_rows = json.loads((src / "config.json").read_text())["vocab_size"]
pd.Series({"checkpoint": str(src), "tokenizer": str(vdir), "base vocabulary": ext.base_vocab_size,
           "new tokens": len(ext.new_ids), "rows": f"{old_rows} -> {ext.rows(old_rows)}",
           "device / dtype": f"{prof.device} / {prof.dtype}" + (" (4-bit base)" if prof.load_in_4bit else "")},
          name="value").to_frame()

# %% [markdown]
# ## 2. Calibrate the output offsets
# `fvt_offset` needs two numbers per model: a direction `d` along which every final hidden state has the
# same projection (so a row update can act like a bias), and a scale `s`, chosen on a little calibration
# text (Turkish training split + English) as the one with the lowest Turkish loss that keeps English within
# 0.5%. The base pieces' correction acts along a second direction, `d_L`, with `h·d_L ≈ 1` in Turkish and
# `≈ 0` in English contexts, and its scale `t` is chosen the same way. This loads the model once (4-bit on a T4).

# %%
import gc

offsets = None
if output_init == "fvt_offset":
    cal_tr, cal_en, train_docs = embeddings.default_calibration_text(turkish_chars=sizes["calibration_chars"])
    calib_model, _ = loading.load_model(src, prof)
    offsets = embeddings.estimate_offset_stats(calib_model, ext, base_tok, ext_tok, cal_tr, cal_en,
                                               count_documents=train_docs[: sizes["count_documents"] or None],
                                               init=init, progress=True)
    del calib_model
    gc.collect()
    rep = offsets.report
    display(pd.DataFrame({"Turkish loss (nats/token)": rep["turkish_nll_per_token"],  # noqa: F821 (IPython)
                          "English change vs base": rep["english_relative_change"]}).rename_axis("scale s"))
    print(f"chosen s = {offsets.scale};  h·d = {rep['direction_fit_mean']:.3f} ± {rep['direction_fit_std']:.3f}")
    if "base_turkish_nll_per_token" in rep:
        display(pd.DataFrame({"Turkish loss (nats/token)": rep["base_turkish_nll_per_token"],  # noqa: F821
                              "English change vs base": rep["base_english_relative_change"]}).rename_axis("base scale t"))
        (tr_mean, tr_std), (en_mean, en_std) = rep["language_direction_turkish"], rep["language_direction_english"]
        print(f"chosen t = {offsets.base_scale};  h·d_L = {tr_mean:.2f} ± {tr_std:.2f} on Turkish, "
              f"{en_mean:.2f} ± {en_std:.2f} on English")

# %% [markdown]
# ## 3. Checkpoint surgery
# Only `embed_tokens` and `lm_head` are read; the shards holding them are rewritten tensor by tensor, the
# others linked or copied; `config.json`, the index, the extended tokenizer and a manifest with hashes are
# written beside them. On the cpu profile the demo's checkpoint is stored in bf16 (half the disk of the fp32
# asset; the weights are a dequantised 4-bit model anyway).

# %%
import time

out = Path(model_out) if model_out else work / "model-ext"
t = time.perf_counter()
manifest = embeddings.extend_checkpoint(src, ext, out, init=init, output_init=output_init, offsets=offsets,
                                        overwrite=True, dtype="bfloat16" if prof.name == "cpu" else None)
size_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
print(f"{time.perf_counter() - t:.0f} s -> {out} ({size_gb:.2f} GB of weights)")
pd.Series({k: manifest[k] for k in ("old_rows", "rows", "init", "output_init", "untied", "tie_decision")}
          | {"shards": ", ".join(f"{k}: {v}" for k, v in manifest["shards"].items())}, name="value").to_frame()

# %% [markdown]
# ## 4. Bits per character at init: base vs extended
# Same text, same characters; the extended model reads it in fewer tokens. Lower is better.

# %%
import matplotlib.pyplot as plt

from trkit import assets, evaluation, report

texts = {"Turkish validation": report.sample_documents(evaluation.read_documents(assets.validation_file()), sizes["eval_chars"]),
         "English": report.sample_documents(evaluation.read_documents(assets.english_file()), sizes["eval_chars"])}
scores = {}
models = {}
for name, (path, tok) in {"base": (src, base_tok), "extended": (out, ext_tok)}.items():
    models[name], _ = loading.load_model(path, prof)
    for text_name, docs in texts.items():
        s = evaluation.score_documents(models[name], tok, docs, desc=f"{name}/{text_name}")
        scores[(name, text_name)] = {"bits per char": s.bits_per_char, "tokens": s.tokens, "chars": s.chars}
table = pd.DataFrame(scores).T
table["tokens"] = table["tokens"].astype(int)
table["chars"] = table["chars"].astype(int)
ax = table["bits per char"].unstack(0).plot.bar(figsize=(6, 3), title="bits per character (lower is better)", rot=0)
ax.set_ylabel("bits / character")
plt.tight_layout()
plt.show()
table.round(4)

# %% [markdown]
# ## 5. Greedy continuations at init
# The same Turkish prompts for both models. "new tokens" counts how many of the generated tokens are among the
# added ones. At init the extended model rarely writes with them: its new output rows start deliberately
# cautious (`fvt_offset` lowers them so they do not steal probability from English), and SmolLM2-135M (the cpu
# demo's model) is small and English-centric, so its Turkish drifts. Training (notebook 04) is what teaches the
# model to write with the new tokens; the same table there shows the change.

# %%
from trkit import generation

prompts = generation.turkish_prompts(texts["Turkish validation"] if not smoke else evaluation.read_documents(assets.validation_file()),
                                     2 if smoke else 4, words=6)
gen_settings = generation.GenerationSettings(prompts=len(prompts), max_new_tokens=8 if smoke else 24, sample=False)
rows = {}
for name, tok in (("base", base_tok), ("extended", ext_tok)):
    for c in generation.generate_continuations(models[name], tok, prompts, gen_settings, base_size=ext.base_vocab_size,
                                               progress=False):
        row = rows.setdefault(c.prompt, {})
        row[name] = " ".join(c.text.split())  # one line per cell
        row[f"{name}: new tokens"] = f"{c.new_tokens} of {c.content_tokens}"
del models
gc.collect()
pd.set_option("display.max_colwidth", None)
pd.DataFrame(rows).T.rename_axis("prompt")

# %% [markdown]
# ## 6. Saved
# The extended checkpoint loads with plain `AutoModelForCausalLM.from_pretrained(dir)`; its manifest lists
# every file's sha256 (re-checked here) and how the rows were initialised. Next: notebook 03 distils the base
# model into it from an offline teacher cache, notebook 04 trains the new rows and adapters.

# %%
from trkit.artifacts import read_manifest

m = read_manifest(out)
pd.Series({"directory": str(out), "files": len(m["files"]), "vocab_size (padded rows)": m["rows"],
           "offset scale": (m.get("offset_stats") or {}).get("scale"), "stored as": m.get("dtype") or "source dtype"},
          name="value").to_frame()
