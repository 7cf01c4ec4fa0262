"""SophiaG: a clipped, diagonal-Hessian-preconditioned optimizer (Liu et al. 2023).

Paper: Hong Liu, Zhiyuan Li, David Hall, Percy Liang, Tengyu Ma, "Sophia: A Scalable Stochastic
Second-order Optimizer for Language Model Pre-training", arXiv:2305.14342 (ICLR 2024).
Reference code: github.com/Liuhong99/Sophia (``sophia.py``, ``train_sophiag.py``; MIT). This file
re-implements the *released* SophiaG update, which differs from the paper's pseudo-code in two
places the authors chose deliberately: no bias correction of the momentum and ``1e-15`` (not
``1e-12``) in the denominator. Hyper-parameters keep the paper's names.

Per parameter ``p`` with gradient ``g`` (state: momentum ``exp_avg`` m, Hessian EMA ``hessian`` h in
fp32, ``step``), one :meth:`SophiaG.step` is::

    p <- p * (1 - lr * weight_decay)                        # decoupled weight decay first
    m <- beta1 * m + (1 - beta1) * g                         # no bias correction
    ratio = clamp(|m| / (rho * bs * h + 1e-15), max=1)       # element-wise clip at 1
    p <- p - lr * sign(m) * ratio

and every ``k`` steps :meth:`SophiaG.update_hessian` folds in a fresh diagonal-Hessian estimate::

    h <- beta2 * h + (1 - beta2) * g_hat * g_hat

where ``g_hat`` is the gradient of the **Gauss-Newton-Bartlett** (GNB) loss computed by
:func:`gauss_newton_bartlett_loss`: run the model, sample labels ``y_hat ~ softmax(logits)`` from the
model's *own* predictive distribution at the positions that carry a label, and take the mean
cross-entropy against those sampled labels. For one position with logits z and probabilities
p = softmax(z), the gradient w.r.t. z is p - e_y_hat, and E[(p - e_y_hat)(p - e_y_hat)^T] =
diag(p) - p p^T, the Hessian of the cross-entropy in z. So E[g_hat g_hat^T] = J^T (diag p - p p^T) J / N
for a mean over N positions: ``N * g_hat**2`` is an unbiased estimate of the Gauss-Newton diagonal of
the mean loss. That is why ``bs`` (the number of label positions the GNB gradient averages over)
multiplies ``h`` in the denominator: ``bs * h`` estimates the curvature of the per-token mean loss.

``rho * bs * h`` larger than ``|m|`` means the step is a Newton-like ``lr * m / (rho * bs * h)``;
otherwise the coordinate is clipped to a sign step of size ``lr``. The share of coordinates *not*
clipped is the "win rate" (:meth:`SophiaG.win_rate`); the authors tune ``rho`` to keep it in 0.1-0.5.

``bs`` lives in each param group (default 5120, the reference ``step(bs=5120)``), not in
``step()``'s arguments: accelerate's optimizer wrapper (used by the Hugging Face Trainer) calls
``step()`` without extra arguments. The training-loop side (when to run the GNB pass, GradScaler
unscaling, the k-cadence from the global step) is in :mod:`trkit.trainer`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

# The released code's denominator floor (the paper's pseudo-code writes 1e-12).
EPS = 1e-15
# Rows of logits turned into probabilities at a time when sampling GNB labels.
_SAMPLE_CHUNK = 1024


class SophiaG(Optimizer):
    """SophiaG with the Gauss-Newton-Bartlett Hessian estimator; see the module docstring.

    Args:
        params: parameters or param groups.
        lr: learning rate (the largest per-coordinate move; default 1e-4 as in the reference).
        betas: (beta1, beta2): momentum and Hessian-EMA coefficients (0.965, 0.99).
        rho: the paper's clipping constant per label position: steps divide by rho * bs * h (0.04).
        weight_decay: decoupled weight decay lambda (0.1).
        bs: label positions behind one Hessian estimate (see the module docstring); the reference
            passes ``total_bs * block_size``. Kept per param group so a training loop can update it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not rho >= 0.0:
            raise ValueError(f"invalid rho {rho}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        if not bs >= 1:
            raise ValueError(f"invalid bs {bs}: the number of label positions per step must be >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs)
        super().__init__(params, defaults)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # At least fp32 for half-precision parameters: g_hat**2 (1e-8 and below) underflows fp16.
            h_dtype = torch.float32 if p.element_size() < 4 else p.dtype
            state["hessian"] = torch.zeros_like(p, dtype=h_dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 * h + (1 - beta2) * grad**2 for every parameter holding a (GNB) gradient.

        Call it right after the backward pass of :func:`gauss_newton_bartlett_loss` (unscaled,
        when a GradScaler is in use), then zero the gradients before the next training step.
        """
        for group in self.param_groups:
            _, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p)["hessian"]
                g = p.grad.to(h.dtype)
                h.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    @torch.no_grad()
    def init_hessian(self) -> None:
        """h <- grad**2: seed the EMA with its first observation (the pre-first-step GNB pass).

        The reference starts from h = 0, so until the EMA fills (about 1/(1-beta2) = 100 updates,
        i.e. 1000 steps at k = 10) the denominators are far too small and nearly every coordinate is
        a full-``lr`` sign step. Seeding h with one estimate is what a bias-corrected EMA would give
        after its first update; the rule for every later update is the reference's.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p)["hessian"]
                g = p.grad.to(h.dtype)
                h.copy_(g * g)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, rho, bs, wd = group["lr"], group["rho"], group["bs"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                m, h = state["exp_avg"], state["hessian"]
                p.mul_(1 - lr * wd)
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (m.abs() / (rho * bs * h + EPS)).clamp(max=1)
                p.addcmul_(m.sign(), ratio.to(p.dtype), value=-lr)
        return loss

    @torch.no_grad()
    def win_rate(self) -> float:
        """Share of coordinates whose step is *not* clipped: |m| < rho * bs * h (reference definition)."""
        total = 0
        unclipped = 0
        for group in self.param_groups:
            scale = group["rho"] * group["bs"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                total += state["exp_avg"].numel()
                unclipped += int((state["exp_avg"].abs() < scale * state["hessian"]).sum())
        return unclipped / total if total else float("nan")

    @torch.no_grad()
    def hessian_norm(self) -> float:
        """L1 norm of the Hessian EMA over all parameters (the reference logs it as ``hessian_norm``)."""
        return float(sum(float(s["hessian"].abs().sum()) for s in self.state.values() if "hessian" in s))


def gauss_newton_bartlett_loss(
    logits: Tensor,
    labels: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """The GNB loss: mean cross-entropy of ``logits`` against labels sampled from ``softmax(logits)``.

    Only positions that carry a label take part: with ``labels`` given, those whose (shifted, for a
    causal LM) label is not ``ignore_index``; otherwise those the ``attention_mask`` keeps (all if
    none). ``shift=True`` follows the causal-LM convention of Hugging Face models (logits at t
    predict the label at t+1). Sampling runs in fp32 on detached logits with ``generator`` (so a
    resumed run can draw the same labels). Returns ``(loss, n)``, n = positions averaged over, the
    ``bs`` that matches this estimate.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., vocab), got shape {tuple(logits.shape)}")
    if labels is not None:
        keep = labels != ignore_index
    elif attention_mask is not None:
        keep = attention_mask.bool()
    else:
        keep = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if shift:
        if logits.dim() != 3:
            raise ValueError(f"shift=True expects (batch, time, vocab) logits, got {tuple(logits.shape)}")
        logits, keep = logits[:, :-1], keep[:, 1:]
    selected = logits[keep.to(logits.device)].float()  # (n, vocab); the fp32 upcast only where needed
    n = selected.shape[0]
    if n == 0:
        raise ValueError("no labelled positions in this batch: the GNB loss needs at least one")
    with torch.no_grad():
        # Chunked, so the fp32 probabilities of a 151k-row vocabulary never exist for all rows at once.
        sampled = torch.cat([
            torch.multinomial(torch.softmax(chunk.detach(), dim=-1), 1, generator=generator).squeeze(-1)
            for chunk in selected.split(_SAMPLE_CHUNK)
        ])
    loss = torch.nn.functional.cross_entropy(selected, sampled, reduction="mean")
    return loss, n
