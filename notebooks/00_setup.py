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
# # 00 · Setup: what machine is this, and is everything in place?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trkit-dev/trkit/blob/main/notebooks/00_setup.ipynb)
#
# trkit teaches Qwen3 Turkish on one GPU. Before any training, this notebook answers four questions:
#
# 1. **Which hardware profile?** A free Colab T4 (15 GB, fp16 only, no FlashAttention-2) needs QLoRA and
#    short sequences; an A100 can train in bf16. trkit picks the profile from the GPU and tells you why.
# 2. **Where do outputs go?** On Colab, Google Drive, so a disconnect loses nothing.
# 3. **Are the libraries the right versions?**
# 4. **Are the inputs reachable?** The Qwen3 tokenizer, a Turkish corpus, a model.
#
# Run it top to bottom (Runtime → Run all). Headless: `python -m trkit notebooks run 00_setup --profile cpu`.

# %% [markdown]
# ## Install
# On Colab this installs trkit from git and the few packages Colab lacks. Elsewhere it does nothing
# (install the project with `pip install -e .` from a checkout).

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
profile = "auto"      # auto | cpu | t4 | a100 | gpu
workdir = ""          # where artifacts go (empty: Drive on Colab, ./trkit-work elsewhere)
mount_drive = True    # Colab only: mount Google Drive for outputs and checkpoints
check_assets = True   # cpu profile: fetch and verify the offline assets; GPU profiles: check the hub

# %% [markdown]
# ## 1. Hardware and profile
# The profile holds the defaults later notebooks use: compute dtype, 4-bit loading, batch, sequence
# length, gradient checkpointing and the base model.

# %%
import pandas as pd

from trkit import profiles

report = profiles.environment_report(profile)
hw, prof = report["hardware"], report["profile"]
print(f"profile: {prof['name']} — {report['reason']}")
pd.DataFrame(
    [("Colab", hw["is_colab"]), ("GPU", hw["gpu_name"] or "none"), ("GPU memory (GB)", hw["gpu_memory_gb"]),
     ("compute capability", hw["gpu_capability"]), ("bf16", hw["bf16"]), ("CPUs", hw["cpu_count"]),
     ("system RAM (GB)", hw["system_ram_gb"]), ("disk free (GB)", hw["disk_free_gb"])]
    + [(f"profile.{k}", prof[k]) for k in ("dtype", "load_in_4bit", "batch_size", "grad_accum", "max_seq_len",
                                            "gradient_checkpointing", "attn_implementation", "base_model", "corpus")],
    columns=["item", "value"],
).set_index("item")

# %% [markdown]
# ## 2. Where outputs go
# Every later notebook reads and writes stage directories (each with a `trkit_manifest.json` of file
# hashes) under this work directory.

# %%
from trkit import colab

colab.mount_drive(mount_drive)
work = colab.default_workdir(workdir or None)
print("work directory:", work)
print("Hugging Face token:", "found (not shown)" if colab.hf_token() else "none (public models only)")

# %% [markdown]
# ## 3. Library versions

# %%
pd.Series(report["versions"], name="version").to_frame()

# %% [markdown]
# ## 4. Inputs
# On the `cpu` profile everything comes from pinned, hash-checked registry packages (no hub access
# needed): the official Qwen3 tokenizer, a Turkish corpus (treebank sentences, Atatürk's speeches,
# KeNet dictionary examples), English text and SmolLM2-135M. On a GPU profile we check the hub instead.

# %%
import matplotlib.pyplot as plt

from trkit import assets

if check_assets and prof["name"] == "cpu":
    info = assets.describe(load_models=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info["qwen3_tokenizer"])
    ok = info["qwen3_tokenizer_sha256"] == assets.QWEN3_TOKENIZER_SHA256
    print(f"Qwen3 tokenizer: len={len(tok)}, sha256 {'matches the pin' if ok else 'MISMATCH'}")
    assert ok and len(tok) == assets.QWEN3_LEN_TOKENIZER
    stats = pd.DataFrame(info["corpus_stats"]).T
    stats["train MB"] = stats["train_chars"] / 1e6
    fig, ax = plt.subplots(figsize=(6, 2.5))
    stats["train MB"].plot.barh(ax=ax, title="Turkish training text per source (million characters)")
    plt.tight_layout()
    plt.show()
    display(stats[["train", "validation", "train_chars", "validation_chars"]])  # noqa: F821 (IPython)
elif check_assets:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(prof["base_model"], token=colab.hf_token())
    print(f"{prof['base_model']}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}")
