"""Training the new rows and adapters (stage 4). This module grows into ``python -m trkit train``.

For now it holds the helpers that moved out of :mod:`trkit.embeddings`: PEFT
``trainable_token_indices`` for the new ids (input and output rows), optimizer parameter groups with
their own learning rate for the rows, packing documents into token blocks, and a plain loop that
trains only the new rows.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Iterable, Sequence

from trkit.embeddings import Extension, _is_tied, new_token_ids

if TYPE_CHECKING:  # pragma: no cover
    import torch




def trainable_token_indices(model, ext: Extension | str | os.PathLike | Sequence[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` for the new ids, input **and** output rows.

    Untied models get both ``embed_tokens`` and ``lm_head``; a tied model gets ``embed_tokens`` only
    (PEFT ties the output adapter to it). Use it in ``LoraConfig(trainable_token_indices=...)`` or
    ``TrainableTokensConfig`` (see ``new_rows_peft_config``).
    """
    ids = list(ext) if isinstance(ext, (list, tuple, range)) else new_token_ids(ext)
    in_name = _module_name(model, model.get_input_embeddings())
    out = {in_name: ids}
    head = model.get_output_embeddings()
    if head is not None and not _is_tied(model):
        out[_module_name(model, head)] = ids
    return out


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def new_rows_peft_config(model, ext, **lora_kwargs):
    """A PEFT config that trains only the new rows.

    Without ``lora_kwargs``: ``TrainableTokensConfig`` (no LoRA; input and output rows). With them
    (e.g. ``r=16, target_modules=[...]``): a ``LoraConfig`` whose ``trainable_token_indices`` trains
    the new rows beside the adapters.
    """
    from peft import LoraConfig, TrainableTokensConfig

    indices = trainable_token_indices(model, ext)
    if lora_kwargs:
        return LoraConfig(trainable_token_indices=indices, **lora_kwargs)
    ids = next(iter(indices.values()))
    return TrainableTokensConfig(target_modules=list(indices), token_indices=ids)


def new_rows_param_groups(model, lr: float, embedding_lr: float | None = None, embedding_lr_ratio: float = 0.2,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: PEFT's trainable token rows get their own learning rate.

    ``embedding_lr`` defaults to ``embedding_lr_ratio * lr`` (embedding rows usually want 2-10x lower
    lr than adapters). Rows never get weight decay (it would pull them to zero, not to the init).
    """
    rows, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rows if "trainable_tokens_delta" in name else rest).append(p)
    if not rows:
        raise ValueError("no trainable token rows found: wrap the model with new_rows_peft_config(...) first")
    groups = [{"params": rows, "lr": embedding_lr if embedding_lr is not None else lr * embedding_lr_ratio,
               "weight_decay": 0.0, "name": "new_token_rows"}]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "adapters"})
    return groups



def pack_documents(tokenizer, documents: Iterable[str], seq_len: int) -> "torch.Tensor":
    """Token blocks of ``seq_len + 1`` ids: documents joined with the document separator (as in
    pretraining) and cut into consecutive blocks. Returns ``(n_blocks, seq_len + 1)``."""
    import torch

    from trkit.evaluation import document_prefix_id

    sep = document_prefix_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream.append(sep)
        stream.extend(ids)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"not enough text for one block of {seq_len + 1} tokens")
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def train_new_rows(
    model,
    ext: Extension | str | os.PathLike | Sequence[int],
    tokenizer,
    documents: Iterable[str],
    *,
    steps: int = 200,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 2e-3,
    warmup: int = 10,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 10,
):
    """Train only the new rows (input and output) with PEFT trainable tokens; everything else frozen.

    A plain loop: AdamW (no weight decay: it would pull the rows to 0, not to their init), linear
    warm-up then cosine decay, random blocks of the packed documents. The trainable rows are kept
    in float32 (master copies; the frozen model may be bf16). Stops after ``steps`` or
    ``max_minutes``. Returns ``(model with the rows merged in, history)``.
    """
    import time

    import torch
    from peft import get_peft_model
    from tqdm.auto import tqdm

    blocks = pack_documents(tokenizer, documents, seq_len)
    peft_model = get_peft_model(model, new_rows_peft_config(model, ext))
    rows = [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]
    for p in rows:
        p.data = p.data.float()
    opt = torch.optim.AdamW(rows, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history: list[dict] = []
    t0 = time.perf_counter()
    peft_model.train()
    bar = tqdm(range(steps), desc="train new rows", disable=not progress)
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)].to(device)
        logits = peft_model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        minutes = (time.perf_counter() - t0) / 60
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0], "minutes": minutes})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if max_minutes is not None and minutes >= max_minutes:
            history.append({"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0], "minutes": minutes,
                            "stopped": "max_minutes"})
            break
    bar.close()
    peft_model.eval()
    return peft_model.merge_and_unload(), history


