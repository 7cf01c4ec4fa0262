"""Merge a PEFT adapter (LoRA, DoRA, trained token rows) into a safetensors checkpoint, one tensor at a time.

What it does. ``merge_adapter(base_dir, adapter_dir, out_dir)`` writes a full checkpoint that
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads without PEFT, reading the base weights from
the checkpoint's own files in their stored dtype (never from a 4-bit model: merging into NF4 would
quantise the update away) and holding one weight matrix in memory at a time, so a merged Qwen3-8B
fits a free Colab's RAM. For each adapted linear layer with frozen weight ``W0`` (out x in):

* LoRA (Hu et al. 2021): ``W = W0 + s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA);
* DoRA (Liu et al. 2024): ``W = m / ||W0 + s B A||_row  *  (W0 + s B A)``, the norm per output row;

computed in fp32 and cast back. Trained token rows (PEFT ``trainable_token_indices`` /
``TrainableTokensConfig``) hold the rows' new values and replace rows ``idx`` of ``embed_tokens`` /
``lm_head``; a tied checkpoint without a stored ``lm_head`` stays tied. Tokenizer and config files are
copied; shards are written with :func:`trkit.checkpoints.write_sharded_checkpoint`, atomically, with a
manifest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from trkit.checkpoints import (read_safetensors_header, read_tensor, resolve_checkpoint, verify_checkpoint, weight_map,
                               write_sharded_checkpoint)

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
              "merges.txt")
PREFIX = "base_model.model."


def _adapter(adapter_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a PEFT adapter directory (trkit train writes OUT/adapter)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (trkit reads safetensors adapters only, never pickled .bin files)")
    return json.loads(cfg_path.read_text(encoding="utf-8")), load_file(str(weights))


def _scaling(cfg: dict) -> float:
    r = cfg["r"]
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  overwrite: bool = False, max_shard_bytes: int = 4 << 30, progress: bool = True) -> Path:
    """Write ``out_dir``: ``base_dir``'s checkpoint with the adapter merged (see the module doc)."""
    import torch
    from trkit.progress import tqdm

    from trkit.artifacts import atomic_directory, write_manifest

    base = resolve_checkpoint(base_dir)
    verify_checkpoint(base)
    adapter_dir = Path(adapter_dir)
    cfg, tensors = _adapter(adapter_dir)
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "TRAINABLE_TOKENS"):
        raise ValueError(f"{adapter_dir}: cannot merge a {peft_type} adapter (LoRA, DoRA and trainable tokens only)")
    wmap, _ = weight_map(base)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rows: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "trainable_tokens_delta" in name:
            module = name.split(".token_adapter.")[0] if ".token_adapter." in name else name.rsplit(".trainable_tokens_delta", 1)[0]
            rows[module + ".weight"] = value
            continue
        for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            if name.endswith("." + part):
                lora.setdefault(name[: -len(part) - 1] + ".weight", {})[part] = value
                break
        else:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key}; only LoRA/DoRA and trainable-token tensors merge")
    missing = sorted(k for k in list(lora) + list(rows) if k not in wmap)
    if missing:
        raise ValueError(f"{adapter_dir} adapts {missing[:3]}, which {base} does not hold: wrong base checkpoint?")
    if peft_type == "TRAINABLE_TOKENS":
        indices = {t: cfg["token_indices"] for t in cfg.get("target_modules", [])}
    else:
        indices = cfg.get("trainable_token_indices") or {}
        if isinstance(indices, list):
            indices = {"embed_tokens": indices}
    index_of = {}
    for module_key in rows:
        short = module_key.rsplit(".", 2)[-2]
        if short not in indices:
            raise ValueError(f"{adapter_dir}: rows for {module_key} but no token indices for {short!r} in its config")
        index_of[module_key] = torch.tensor(indices[short])
    s = _scaling(cfg) if lora else 1.0
    use_dora = bool(cfg.get("use_dora"))
    tied_rows = None
    emb_key = next((k for k in rows if k.endswith("embed_tokens.weight")), None)
    if emb_key and "lm_head.weight" in wmap and "lm_head.weight" not in rows:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        if config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)):
            tied_rows = emb_key  # a stored copy of a tied matrix gets the same rows

    headers = {shard: read_safetensors_header(base / shard)[0] for shard in set(wmap.values())}

    bar = tqdm(total=len(wmap), desc="merge", unit="tensor", disable=not progress)

    def producer(name: str, shard: str):
        def produce():
            bar.update(1)
            w = read_tensor(base / shard, name)
            if name in lora:
                parts = lora[name]
                A, B = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
                merged = w.float() + s * (B @ A)
                if use_dora:
                    norm = merged.norm(dim=1, keepdim=True)
                    merged = parts["lora_magnitude_vector"].float().unsqueeze(1) / norm * merged
                return merged.to(w.dtype)
            key = name if name in rows else (tied_rows if name == "lm_head.weight" and tied_rows else None)
            if key is not None:
                w = w.clone()
                w[index_of[key]] = rows[key].to(w.dtype)
            return w
        return produce

    items = []
    for name in sorted(wmap, key=lambda n: (wmap[n], headers[wmap[n]][n]["data_offsets"][0])):
        info = headers[wmap[name]][name]
        items.append((name, producer(name, wmap[name]), info["dtype"], list(info["shape"])))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[base, adapter_dir]) as tmp:
        write_sharded_checkpoint(tmp, items, max_shard_bytes=max_shard_bytes)
        bar.close()
        for f in COPY_FILES:
            src = adapter_dir / f if (adapter_dir / f).is_file() and f != "config.json" else base / f
            if src.is_file():
                shutil.copyfile(src, tmp / f)
        write_manifest(tmp, "merge", base=str(base), adapter=str(adapter_dir), peft_type=peft_type, use_dora=use_dora,
                       merged_layers=len(lora), merged_rows=sorted(rows))
    return out_dir
