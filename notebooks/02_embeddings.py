# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
#   merged token does not start as likely as its pieces and does not steal probability in English.
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
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"trkit @ {TRKIT_GIT}",
                    "-r", "https://raw.githubusercontent.com/trkit-dev/trkit/main/requirements-colab.txt"], check=True)

# %% tags=["parameters"]
profile = "auto"            # auto | cpu | t4 | a100 | gpu
workdir = ""                # empty: Drive on Colab, ./trkit-work elsewhere
base_model = "auto"         # auto: the profile's model (GPU: Qwen/Qwen3-8B, cpu: SmolLM2-135M); or a dir / hub name
vocab_dir = ""              # the tokenizer from notebook 01 (empty: <workdir>/vocab, learned now if missing)
new_tokens = 20_000         # only used when the vocabulary has to be learned here
init = "fvt"                # input rows: fvt | mean | random
output_init = "fvt_offset"  # output rows: fvt_offset | fvt | first | mean | random
eval_chars = 30_000         # characters of Turkish validation / English text to score (0: all)
calibration_chars = 20_000  # Turkish calibration characters for fvt_offset (training split, never validation)
model_out = ""              # where the extended checkpoint goes (empty: <workdir>/model-ext). A free Drive holds
                            # 15 GB: for Qwen3-8B point this at local disk (/content/...) and copy what you need.

# %% [markdown]
# ## 1. Base model and extended tokenizer
# The vocabulary extension records the fingerprint of the tokenizer it was learned on; the surgery refuses
# a checkpoint whose tokenizer is a different one.

# %%
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer

from trkit import colab, embeddings, evaluation, profiles, vocab

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
model_name = prof.base_model if base_model == "auto" else base_model
src = embeddings.resolve_checkpoint(model_name)  # offline alias, local dir, or hub snapshot
vdir = Path(vocab_dir) if vocab_dir else work / "vocab"
if not (vdir / "trkit_manifest.json").exists():
    print(f"no vocabulary at {vdir}: learning {new_tokens} tokens on the default corpus")
    vocab.extend_tokenizer(str(src), "default", new_tokens, vdir, overwrite=True)
ext = embeddings.load_extension(vdir)
embeddings.check_tokenizer_pair(ext, src)
base_tok, ext_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(vdir)
# CPUs with AVX512-BF16 run bf16 ~5x faster than fp32; T4s have no bf16.
dtype = getattr(torch, "bfloat16" if prof.name == "cpu" else prof.dtype)
import json

old_rows = json.loads((src / "config.json").read_text())["vocab_size"]
pd.Series({"checkpoint": str(src), "tokenizer": str(vdir), "base vocabulary": ext.base_vocab_size,
           "new tokens": len(ext.new_ids), "rows": f"{old_rows} -> {ext.rows(old_rows)}",
           "device / dtype": f"{prof.device} / {dtype}"},
          name="value").to_frame()

# %% [markdown]
# ## 2. Calibrate the output offsets
# `fvt_offset` needs two numbers per model: a direction `d` along which every final hidden state has the
# same projection (so a row update can act like a bias), and a scale `s`, chosen on a little calibration
# text (Turkish training split + English) as the one with the lowest Turkish loss that keeps English within
# 0.5%. This loads the model once (4-bit on a T4).

# %%
import gc

from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load(path, four_bit=False):
    kw = {"dtype": dtype}
    if four_bit:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model if four_bit else model.to(prof.device)


offsets = None
if output_init == "fvt_offset":
    cal_tr, cal_en, train_docs = embeddings.default_calibration_text(turkish_chars=calibration_chars)
    calib_model = load(src, four_bit=prof.load_in_4bit)
    offsets = embeddings.estimate_offset_stats(calib_model, ext, base_tok, ext_tok, cal_tr, cal_en,
                                               count_documents=train_docs, init=init, progress=True)
    del calib_model
    gc.collect()
    rep = offsets.report
    display(pd.DataFrame({"Turkish loss (nats/token)": rep["turkish_nll_per_token"],  # noqa: F821 (IPython)
                          "English change vs base": rep["english_relative_change"]}).rename_axis("scale s"))
    print(f"chosen s = {offsets.scale};  h·d = {rep['direction_fit_mean']:.3f} ± {rep['direction_fit_std']:.3f}")

# %% [markdown]
# ## 3. Checkpoint surgery
# Only `embed_tokens` and `lm_head` are read; the shards holding them are rewritten tensor by tensor, the
# others linked or copied; `config.json`, the index, the extended tokenizer and a manifest with hashes are
# written beside them.

# %%
import time

out = Path(model_out) if model_out else work / "model-ext"
t = time.perf_counter()
manifest = embeddings.extend_checkpoint(src, ext, out, init=init, output_init=output_init, offsets=offsets,
                                        overwrite=True)
print(f"{time.perf_counter() - t:.0f} s -> {out}")
pd.Series({k: manifest[k] for k in ("old_rows", "rows", "init", "output_init", "untied")}
          | {"shards": ", ".join(f"{k}: {v}" for k, v in manifest["shards"].items())}, name="value").to_frame()

# %% [markdown]
# ## 4. Bits per character at init: base vs extended
# Same text, same characters; the extended model reads it in fewer tokens. Lower is better.

# %%
import matplotlib.pyplot as plt

from trkit import assets


def sample(docs, chars):
    if not chars:
        return docs
    out, n = [], 0
    for d in docs:
        if n >= chars:
            break
        out.append(d)
        n += len(d)
    return out


texts = {"Turkish validation": sample(evaluation.read_documents(assets.validation_file()), eval_chars),
         "English": sample(evaluation.read_documents(assets.english_file()), eval_chars)}
scores = {}
for name, (path, tok) in {"base": (src, base_tok), "extended": (out, ext_tok)}.items():
    model = load(path, four_bit=prof.load_in_4bit).eval()
    for text_name, docs in texts.items():
        s = evaluation.score_documents(model, tok, docs, desc=f"{name}/{text_name}")
        scores[(name, text_name)] = {"bits per char": s.bits_per_char, "tokens": s.tokens, "chars": s.chars}
    if name == "base":
        del model
        gc.collect()
table = pd.DataFrame(scores).T
table.unstack(0)["bits per char"].plot.bar(figsize=(6, 3), title="bits per character (lower is better)", rot=0)
plt.tight_layout()
plt.show()
table.round(4)

# %% [markdown]
# ## 5. Greedy continuations
# Before any training the extended model already writes with its new tokens.

# %%
base_model_obj = load(src, four_bit=prof.load_in_4bit).eval()
prompts = ["Türkiye'nin başkenti", "Öğrenciler için hazırlanmış", "The capital of France is"]
rows = []
for p in prompts:
    row = {"prompt": p}
    for name, (m, tok) in {"base": (base_model_obj, base_tok), "extended": (model, ext_tok)}.items():
        ids = tok(p, return_tensors="pt").to(m.device)
        with torch.no_grad():
            gen = m.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        row[name] = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    rows.append(row)
pd.DataFrame(rows).set_index("prompt")

# %% [markdown]
# ## 6. Saved
# The extended checkpoint loads with plain `AutoModelForCausalLM.from_pretrained(dir)`; its manifest lists
# every file's sha256 (re-checked here) and how the rows were initialised. Next: train the new rows (and
# adapters) in the following notebooks, starting from this directory. For training only the new rows,
# `embeddings.new_rows_peft_config(model, ext)` and `embeddings.new_rows_param_groups(...)` are ready-made.

# %%
from trkit.artifacts import read_manifest

m = read_manifest(out)
pd.Series({"directory": str(out), "files": len(m["files"]), "vocab_size (padded rows)": m["rows"],
           "offset scale": (m.get("offset_stats") or {}).get("scale")}, name="value").to_frame()
