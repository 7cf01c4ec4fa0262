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
# # 01 · Vocabulary: make the model spend fewer tokens on Turkish
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/01_vocab.ipynb)
#
# Qwen3 spends about 2.6 tokens per Turkish word (English: 1.3). Here we teach its tokenizer Turkish the
# right way: **continued BPE**. The corpus is split into words exactly as the tokenizer does it, every
# word starts from the tokenizer's own segmentation, and the most useful adjacent pairs are merged until
# N new tokens exist. The merges are *appended*: every existing id, special token and the chat template
# stay as they were, and a new token only ever glues existing tokens together.
# (`tokenizer.add_tokens(...)`, what most tutorials do, splits the leading space off and garbles ğ ı İ on
# decode — don't.)
#
# Steps: prepare the corpus → learn merges → report → save (→ optionally push to the hub).
# Headless: `python -m trkit notebooks run 01_vocab --profile cpu`.

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
corpus = "auto"           # auto: the profile's corpus (cpu: offline default; GPU: FineWeb-2 tur_Latn, streamed);
                          # or "default", a hub dataset "name" / "name:config", or a local file path
hub_documents = None      # documents streamed from a hub corpus (None: the profile's plan; FineWeb-2 pages ~3.5k chars)
base_tokenizer = "auto"   # auto: the profile's base model (GPU: Qwen/Qwen3-8B, cpu: SmolLM2); or "qwen3", a dir, a hub name
new_tokens = None         # None: the profile's plan (20,000; the smoke test learns fewer)
selection = "balanced"    # balanced (default) | frequency
morphology = False        # discourage merges across Turkish stem|suffix boundaries (measured: no gain, see README)
push_to_hub = ""          # e.g. "your-name/qwen3-tokenizer-tr" to upload the result (needs a write token)

# %% [markdown]
# ## 1. Prepare the corpus
# Normalise (NFC, mojibake repair), filter (length, a Turkish-likeness score, control and junk characters),
# remove exact and near duplicates (MinHash LSH), split by hash into train/validation/test, and drop
# validation/test documents that share a long n-gram with train.

# %%
from pathlib import Path

import pandas as pd

from trkit import colab, corpus as corpus_stage, plans, profiles

prof = profiles.get_profile(profile)
work = colab.default_workdir(workdir or None)
sizes = plans.plan("vocab", prof.name, smoke=smoke, new_tokens=new_tokens, hub_documents=hub_documents)
source = prof.corpus if corpus == "auto" else corpus
corpus_dir = work / "corpus"
if source == "default" or Path(source).exists():
    prep = corpus_stage.prepare_corpus(source, corpus_dir, overwrite=True, limit=sizes["corpus_documents"] or None)
else:
    name, _, config_name = source.partition(":")
    prep = corpus_stage.prepare_corpus(hub=name, hub_config=config_name or None, limit=sizes["hub_documents"],
                                       out_dir=corpus_dir, overwrite=True)
print(f"profile {prof.name}: corpus {source} -> {corpus_dir} in {prep.seconds:.0f} s")
pd.DataFrame(prep.table()).set_index("what")

# %% [markdown]
# ## 2. Learn the merges
# Pair scores are balanced across the corpus's sources (each source's counts rescaled halfway towards the
# same total, then summed as log1p, so a pair found in every source wins over one frequent in a single
# source): measured on registers the merges were not learned on, this gives more reduction and leaves
# fewer new tokens unused than plain frequency-greedy BPE.

# %%
from trkit import vocab

base_name = prof.base_model if base_tokenizer == "auto" else base_tokenizer
vocab_dir = work / "vocab"
ext = vocab.extend_tokenizer(base_name, corpus_dir, sizes["new_tokens"], vocab_dir, selection=selection,
                             morphology=morphology, overwrite=True)
print(f"{ext.n_new_tokens} new tokens, ids {ext.base_vocab_size}..{ext.base_vocab_size + ext.n_new_tokens - 1}; "
      f"{ext.seconds['total']:.1f} s ({ext.seconds['learn_merges']:.1f} s learning)")
# tokens as text; a byte that is only part of a character shows as <0xNN> (never as a replacement character)
show = vocab.readable_token
pd.DataFrame([{"id": t["id"], "token": repr(show(t["token"])), "= left + right": f"{show(t['left'])!r} + {show(t['right'])!r}"}
              for t in ext.new_tokens[:12]]).set_index("id")

# %% [markdown]
# ## 3. Report
# Tokens per word before and after on the held-out validation split of every source, and on English
# (which must not change). Round-trip failures and coarsening violations must be 0.

# %%
import matplotlib.pyplot as plt

from trkit import assets, tokstats

texts = {f"tr-{k}": v for k, v in corpus_stage.split_files(corpus_dir, "validation").items()}
texts["english"] = assets.english_file()
report = tokstats.compare(vocab.load_base(base_name).backend, vocab_dir, texts,
                          languages={k: ("english" if k == "english" else "turkish") for k in texts})
table = pd.DataFrame(report["sources"]).T
cols = ["documents", "words", "base_fertility", "fertility", "pct_fewer", "new_tokens_used",
        "roundtrip_failures", "coarsening_violations"]
fig, ax = plt.subplots(figsize=(7, 3))
table[["base_fertility", "fertility"]].rename(columns={"base_fertility": "base", "fertility": "extended"}).plot.bar(
    ax=ax, title="tokens per word (lower is better)")
ax.set_ylabel("tokens per word")
plt.xticks(rotation=0)
plt.tight_layout()
plt.show()
totals = pd.DataFrame({f"ALL {lang}": stats for lang, stats in report["totals"].items()}).T
shown = pd.concat([table[cols], totals.reindex(columns=cols)])
counts = ["documents", "words", "new_tokens_used", "roundtrip_failures", "coarsening_violations"]
shown[counts] = shown[counts].astype("Int64")  # counts are integers, not 61.0
shown.round(3)

# %%
import numpy as np

tr_docs = [d for k, v in texts.items() if k.startswith("tr-") for d in tokstats.read_documents(v)]
before = tokstats.word_token_counts(vocab.load_base(base_name).backend, tr_docs)
after = tokstats.word_token_counts(vocab_dir, tr_docs)
bins = np.arange(1, 9) - 0.5
plt.figure(figsize=(6, 2.8))
plt.hist([np.minimum(before, 7), np.minimum(after, 7)], bins=bins, label=["base", "extended"])
plt.title("how many tokens a Turkish word costs (held-out validation text)")
plt.xlabel("tokens per Turkish word (7 = 7 or more)")
plt.ylabel("words")
plt.legend()
plt.tight_layout()
plt.show()

# %%
from transformers import AutoTokenizer

base_tok, ext_tok = AutoTokenizer.from_pretrained(vocab.load_base(base_name).directory), AutoTokenizer.from_pretrained(vocab_dir)
sentences = ["Geliyorum eve, yarın görüşürüz.", "Öğrenciler için hazırlanmış materyaller.",
             "Türkiye'nin eğitim sisteminde gelişmeler."]


pd.set_option("display.max_colwidth", None)  # the whole segmentation, never cut at 50 characters
pd.DataFrame([{"sentence": s, "base": " | ".join(vocab.segmentation(base_tok, s)),
               "extended": " | ".join(vocab.segmentation(ext_tok, s))} for s in sentences])

# %% [markdown]
# ## 4. Save
# The directory already lives in the work folder (on Colab: Google Drive). Plain
# `AutoTokenizer.from_pretrained(dir)` loads it, no trkit needed; `trkit_manifest.json` records the base
# tokenizer's hash and fingerprint, the corpus hash, the parameters and every new token with its parents.

# %%
from trkit.artifacts import read_manifest

manifest = read_manifest(vocab_dir)  # also re-checks every file's hash
pd.Series({"directory": str(vocab_dir), "base": manifest["base_tokenizer"], "base vocab": manifest["base_vocab_size"],
           "new tokens": len(manifest["new_tokens"]), "corpus sha256": manifest["corpus_sha256"][:16] + "…",
           "files": ", ".join(manifest["files"])}, name="value").to_frame()

# %% [markdown]
# ## 5. Optional: push to the Hugging Face hub

# %%
if push_to_hub:
    ext_tok.push_to_hub(push_to_hub, token=colab.hf_token())
    print("pushed to", push_to_hub)
else:
    print("push_to_hub is empty: nothing uploaded")
