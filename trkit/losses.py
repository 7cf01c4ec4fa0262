"""Language-model losses computed from the final hidden states in sequence chunks, never from full logits.

Why. A causal LM's loss needs ``log softmax(h W^T)`` at every position. Materialised at once, the
fp32 logits of Qwen3-8B + 20k new tokens at 2 x 2048 tokens are 2 x 2048 x 171,936 x 4 B = 2.8 GB,
and autograd keeps them (and their gradient) for the backward pass. Here the head's matrix product,
the loss and its gradients are computed chunk by chunk of positions **inside the forward pass**:
for a chunk of hidden states ``h_c``

    z_c = h_c W^T   (in the head's dtype, then fp32)       loss_c = f(z_c, targets_c)
    dL/dh_c = (df/dz_c) W        dL/dW_rows = (df/dz_c)^T h_c   (only for trainable rows)

``df/dz_c`` comes from autograd on the small chunk graph (so any per-chunk loss works: cross-entropy,
a distillation KL, Sophia's Gauss-Newton-Bartlett loss), the chunk graph is freed at once, and only
``dL/dh`` (batch x time x hidden) and the trainable rows' gradient are kept; the backward pass
multiplies them by the incoming gradient (the loss is a plain sum of the chunks, so this is exact,
GradScaler included). Peak memory is one chunk's logits; the work is the same as the full loss's
(one forward and two backward matrix products per chunk), with no recomputation. This is the idea of
Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels
for LLM Training"), written here in plain PyTorch so it runs on CPU, T4 and A100 alike.

The head may be a plain ``nn.Linear`` or PEFT's trainable-token layer (``trainable_token_indices``):
its frozen matrix plus trainable rows that replace rows ``idx`` (the new tokens). The rows' logits
are ``h_c delta^T`` written into columns ``idx``, so no copy of the whole matrix is ever made.

Functions return the **sum** over labelled positions (and the count); the caller divides by the
number of labelled tokens of the whole optimizer step, which is what makes gradient accumulation
and data-parallel training exactly equal to one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # positions per chunk: 1024 x 171,936 fp32 logits = 0.7 GB on Qwen3-8B + 20k


@dataclass
class HeadParts:
    """The output layer as the chunked losses see it: ``logits = h @ weight^T`` with rows ``idx``
    replaced by ``delta`` (PEFT trainable tokens), in ``weight``'s dtype."""

    weight: Tensor
    idx: Tensor | None = None
    delta: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def span(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when ``idx`` is the contiguous range lo..hi-1 (a vocabulary extension's new ids):
        the rows' columns are then a slice, with no gather or scatter."""
        if self.idx is None or self.idx.numel() == 0:
            return None
        lo, hi = int(self.idx[0]), int(self.idx[-1]) + 1
        return (lo, hi) if hi - lo == self.idx.numel() and bool((self.idx.diff() == 1).all()) else None


def head_parts(model: nn.Module) -> HeadParts:
    """:class:`HeadParts` of a causal LM (plain, PEFT-wrapped, with trainable token rows, tied or not)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    layer = getattr(head, "token_adapter", head)  # PEFT's TrainableTokensWrapper holds the layer
    if hasattr(layer, "trainable_tokens_delta") and hasattr(layer, "base_layer"):
        active = [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]
        if getattr(layer, "merged", False) or not active:
            return HeadParts(layer.base_layer.weight)
        if len(active) > 1:
            raise ValueError("several trainable-token adapters are active on lm_head; activate one")
        name = active[0]
        idx = torch.as_tensor(layer.token_indices[name], device=layer.base_layer.weight.device)
        return HeadParts(layer.base_layer.weight, idx, layer.trainable_tokens_delta[name])
    base = getattr(head, "base_layer", head)
    if getattr(base, "bias", None) is not None:
        raise ValueError("the chunked loss supports an output layer without bias (every Qwen3 / Llama head)")
    if not isinstance(base, nn.Linear):
        raise ValueError(f"unsupported output layer {type(head).__name__}; use loss='full'")
    return HeadParts(base.weight)


def chunk_logits(h: Tensor, parts: HeadParts, delta: Tensor | None, span: tuple[int, int] | None = None) -> Tensor:
    """fp32 logits of hidden rows ``h`` (n x hidden): ``h W^T`` in the head's dtype, rows ``idx`` from ``delta``
    (cast to the head's dtype, as PEFT's merged matrix is)."""
    w = parts.weight
    hb = h.to(w.dtype)
    z = (hb @ w.T).float()
    if parts.idx is not None and delta is not None:
        new = (hb @ delta.to(w.dtype).T).float()
        if span is not None:
            z[:, span[0] : span[1]] = new
        else:
            z[:, parts.idx] = new
    return z


class AnalyticLoss:
    """A per-chunk loss that returns its own gradient: ``fn(z, sl) -> (loss, dL/dz)``; ``z`` (fp32, owned by
    the caller) may be overwritten to hold the gradient, which saves a chunk-sized buffer and the autograd
    round trip of log-softmax."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, z: Tensor, sl: slice):
        return self.fn(z, sl)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum_c f(z_c) with z_c = chunk_logits(h_c); gradients computed chunk by chunk in forward.

    Per chunk only ``df/dz`` comes from autograd (on the fp32 logits as a leaf); the three products are
    written out, all in the head's dtype (bf16/fp16 matrix products are several times faster than fp32
    ones on CPUs with AMX and on GPUs):

        dL/dh = dz W + dz[:, idx] (delta - W[idx])        dL/d delta = dz[:, idx]^T h
        dL/dW = dz^T h   (only when the head matrix itself trains)
    """

    @staticmethod
    def forward(ctx, hidden, weight, delta, chunk_fn, rows, parts, chunk_size, grad_enabled):
        need_h = grad_enabled and hidden.requires_grad
        need_d = grad_enabled and delta is not None and delta.requires_grad
        need_w = grad_enabled and weight.requires_grad
        w = weight.detach()
        idx = parts.idx
        span = parts.span
        d = delta.detach().to(w.dtype) if delta is not None else None
        fix = (d - w.index_select(0, idx)) if (need_h and d is not None) else None  # row correction of dL/dh
        flat = hidden.reshape(-1, hidden.shape[-1])
        grad_h = torch.zeros_like(flat) if need_h else None
        grad_d = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device) if need_d else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        analytic = isinstance(chunk_fn, AnalyticLoss)
        for lo in range(0, rows.numel(), chunk_size):
            sel = rows[lo : lo + chunk_size]
            sl = slice(lo, lo + sel.numel())
            h = flat.index_select(0, sel).detach().to(w.dtype)
            want = need_h or need_d or need_w
            with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
                z = chunk_logits(h, HeadParts(w, idx, d), d, span)
            if analytic:
                with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
                    loss, dz = chunk_fn(z, sl)
                dz = dz if want else None
            else:
                with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
                    z.requires_grad_(want)
                    loss = chunk_fn(z, sl)
                    dz = torch.autograd.grad(loss, z)[0] if want and loss.requires_grad else None
            total += loss.detach().double()
            if dz is None:
                continue
            dzb = dz.to(w.dtype)
            del z, dz
            dz_new = None
            if idx is not None and (need_d or fix is not None):
                dz_new = dzb[:, span[0] : span[1]] if span is not None else dzb[:, idx]
            if need_h:
                gh = dzb @ w
                if fix is not None:
                    gh.addmm_(dz_new, fix)
                grad_h.index_copy_(0, sel, gh.to(grad_h.dtype))  # each position is in one chunk only
            if need_d:
                grad_d += (dz_new.T @ h).float()
            if need_w:
                grad_w += (dzb.T @ h).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_d, grad_w) if t is not None))
        ctx.layout = (need_h, need_d, need_w, hidden.shape)
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_d, need_w, shape = ctx.layout
        saved = iter(ctx.saved_tensors)
        gh = next(saved).mul(grad_out).reshape(shape) if need_h else None
        gd = next(saved).mul(grad_out) if need_d else None
        gw = next(saved).mul(grad_out) if need_w else None
        return gh, gw, gd, None, None, None, None, None


def chunked_head_loss(hidden: Tensor, parts: HeadParts, rows: Tensor,
                      chunk_fn: Callable[[Tensor, slice], Tensor], chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``sum_c chunk_fn(logits_c, slice_c)`` over the flattened positions ``rows`` of ``hidden``.

    ``chunk_fn(logits, sl)`` gets the fp32 logits of positions ``rows[sl]`` (n x vocab) and returns a
    scalar (a sum over those positions). Differentiable in ``hidden``, the trainable rows and (if it
    requires grad) the head matrix; see the module docstring for how the memory stays at one chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rows.numel() == 0:
        return hidden.sum() * 0.0
    return _ChunkedHeadLoss.apply(hidden, parts.weight, parts.delta, chunk_fn, rows, parts, chunk_size,
                                  torch.is_grad_enabled())


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal-LM convention (Hugging Face): position t predicts ``labels[t+1]``. Returns the flattened
    positions that carry a label (into ``hidden[:, :-1]`` reshaped to rows of ``hidden``) and those labels."""
    b, t = labels.shape
    nxt = labels[:, 1:]
    keep = nxt != IGNORE_INDEX
    pos = torch.arange(t, device=labels.device).expand(b, t)[:, :-1]
    rows = (torch.arange(b, device=labels.device)[:, None] * t + pos)[keep]
    return rows, nxt[keep]


def chunked_cross_entropy(hidden: Tensor, parts: HeadParts, labels: Tensor,
                          chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy (nats) of ``labels`` (HF convention, -100 = ignored) and the count."""
    rows, targets = shifted_targets(labels)

    def ce(z: Tensor, sl: slice):
        # loss = logsumexp(z) - z[target]; dL/dz = softmax(z) - onehot(target), built in z's own buffer
        t = targets[sl]
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, t[:, None])[:, 0]
        loss = (lse - picked).sum()
        z.sub_(lse[:, None]).exp_()
        z[torch.arange(len(t), device=z.device), t] -= 1.0
        return loss, z

    return chunked_head_loss(hidden, parts, rows, AnalyticLoss(ce), chunk_size), int(targets.numel())


def full_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """The same sum from materialised logits (the model's own head): for comparison and ``--loss full``."""
    nxt = labels[:, 1:]
    keep = nxt != IGNORE_INDEX
    z = logits[:, :-1][keep].float()
    return nn.functional.cross_entropy(z, nxt[keep], reduction="sum"), int(keep.sum())


def chunked_gnb_loss(hidden: Tensor, parts: HeadParts, labels: Tensor, generator: torch.Generator | None,
                     chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, int]:
    """Sophia's Gauss-Newton-Bartlett loss, chunked: labels sampled from the model's own softmax at
    every labelled position, summed cross-entropy against them (see :mod:`trkit.sophia`)."""
    rows, _ = shifted_targets(labels)

    def gnb(logits: Tensor, sl: slice) -> Tensor:
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(-1)
        return nn.functional.cross_entropy(logits, sampled, reduction="sum")

    return chunked_head_loss(hidden, parts, rows, gnb, chunk_size), int(rows.numel())
