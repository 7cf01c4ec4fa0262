"""SophiaG: a clipped, diagonal-Hessian-preconditioned optimizer (Liu et al. 2023).

Paper: Hong Liu, Zhiyuan Li, David Hall, Percy Liang, Tengyu Ma, "Sophia: A Scalable Stochastic
Second-order Optimizer for Language Model Pre-training", arXiv:2305.14342 (ICLR 2024).
Reference code: github.com/Liuhong99/Sophia (``sophia.py``, ``train_sophiag.py``; MIT). This file
re-implements the *released* SophiaG update, which differs from the paper's pseudo-code in two
places the authors chose deliberately: no bias correction of the momentum and ``1e-15`` (not
``1e-12``) in the denominator. Hyper-parameters keep the paper's names.

Per parameter ``p`` with gradient ``g`` (state: momentum ``exp_avg`` m, curvature EMA ``hessian`` h
in at least fp32, ``step``), one :meth:`SophiaG.step` is::

    p <- p * (1 - lr * weight_decay)                        # decoupled weight decay first
    m <- beta1 * m + (1 - beta1) * g                         # no bias correction
    ratio = clamp(|m| / (rho * h + 1e-15), max=1)            # element-wise clip at 1
    p <- p - lr * sign(m) * ratio

and every ``k`` steps :meth:`SophiaG.update_hessian` folds in a fresh diagonal-Hessian estimate::

    h <- beta2 * h + (1 - beta2) * n * g_hat * g_hat

where ``g_hat`` is the gradient of the **Gauss-Newton-Bartlett** (GNB) loss computed by
:func:`gauss_newton_bartlett_loss` over ``n`` label positions: run the model, sample labels
``y_hat ~ softmax(logits)`` from the model's *own* predictive distribution at the positions that
carry a label, and take the mean cross-entropy against those sampled labels. For one position with
logits z and probabilities p = softmax(z), the gradient w.r.t. z is p - e_y_hat, and
E[(p - e_y_hat)(p - e_y_hat)^T] = diag(p) - p p^T, the Hessian of the cross-entropy in z; the
positions' sampled labels are independent and each term has mean zero, so for a mean over n
positions E[g_hat g_hat^T] = (1/n) * (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i. Hence
``n * g_hat**2`` is an unbiased estimate of the Gauss-Newton diagonal of the per-position mean loss
*whatever n is*, and ``h`` is the EMA of those per-position estimates.

Scale, and how it maps onto the reference. The reference keeps ``h_ref = EMA(g_hat**2)`` and
divides by ``rho * bs * h_ref`` with one constant ``bs`` (``total_bs * block_size``) passed to every
``step``; with a constant n = bs, ``bs * h_ref = EMA(bs * g_hat**2)`` is exactly this ``h``, so the
step and ``rho``'s meaning are the reference's. With n that varies from pass to pass (dynamic
padding, a packing remainder, prompt masking), multiplying the EMA by the *last* pass's n would
weight every earlier estimate by n_last / n_i (off by 0.3-3x for n in 50-1000); scaling each
estimate by its own n before it enters the EMA is what keeps ``h`` the Gauss-Newton diagonal.

Standalone use::

    opt = SophiaG(model.parameters(), lr=2e-4, rho=0.04, bs=batch * block_size)   # reference style
    ...every k steps:  gnb_loss, n = gauss_newton_bartlett_loss(logits, labels); gnb_loss.backward()
                       opt.update_hessian(n)      # or opt.update_hessian(): uses the group's bs
                       opt.zero_grad(set_to_none=True)

``update_hessian()`` without an argument takes n from each param group's ``bs`` (default 5120, the
reference ``step(bs=5120)``), i.e. the reference's constant-bs usage. ``rho * h`` larger than ``|m|``
means the step is a Newton-like ``lr * m / (rho * h)``; otherwise the coordinate is clipped to a
sign step of size ``lr``. The share of coordinates *not* clipped is the "win rate"
(:meth:`SophiaG.win_rate`); the authors tune ``rho`` to keep it in 0.1-0.5. The training-loop
side (when to run the GNB pass, GradScaler unscaling, dropout and NEFTune off in the pass, the
k-cadence from the global step) is in :mod:`trkit.trainer`.

Checkpoints: ``hessian`` holds the per-position estimate (reference ``bs * h``); optimizer states
saved by trkit before this scale was fixed held ``EMA(g_hat**2)`` and are not comparable.
"""

from __future__ import annotations

import operator
from typing import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

# The released code's denominator floor (the paper's pseudo-code writes 1e-12).
EPS = 1e-15
# Rows of logits turned into probabilities at a time when sampling GNB labels.
_SAMPLE_CHUNK = 1024


def _check_positions(positions) -> int:
    try:
        n = operator.index(positions)
    except TypeError:
        n = 0
    if isinstance(positions, bool) or n < 1:
        raise ValueError(f"positions must be the number (an int >= 1) of label positions the GNB loss "
                         f"averaged over, got {positions!r}")
    return n


class SophiaG(Optimizer):
    """SophiaG with the Gauss-Newton-Bartlett Hessian estimator; see the module docstring.

    Args:
        params: parameters or param groups.
        lr: learning rate (the largest per-coordinate move; default 1e-4 as in the reference).
        betas: (beta1, beta2): momentum and Hessian-EMA coefficients (0.965, 0.99).
        rho: the paper's clipping constant: steps divide by rho * h, h ~ the Gauss-Newton diagonal
            of the per-position mean loss (the reference's rho * bs * h_ref) (0.04).
        weight_decay: decoupled weight decay lambda (0.1).
        bs: label positions behind one GNB gradient when :meth:`update_hessian` is called without
            ``positions`` (the reference's constant ``total_bs * block_size``; default 5120).
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
            raise ValueError(f"invalid bs {bs}: the number of label positions per GNB gradient must be >= 1")
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

    def _fold(self, positions: int | None, seed: bool) -> None:
        if positions is not None:
            positions = _check_positions(positions)
        for group in self.param_groups:
            _, beta2 = group["betas"]
            n = positions if positions is not None else group["bs"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p)["hessian"]
                g = p.grad.to(h.dtype)
                if seed:
                    torch.mul(g, g, out=h).mul_(n)
                else:
                    h.mul_(beta2).addcmul_(g, g, value=(1 - beta2) * n)

    @torch.no_grad()
    def update_hessian(self, positions: int | None = None) -> None:
        """h <- beta2 * h + (1 - beta2) * n * grad**2 for every parameter holding a (GNB) gradient.

        ``positions`` is n, the label positions the GNB loss averaged over (the second value
        :func:`gauss_newton_bartlett_loss` returns); ``None`` uses each group's constant ``bs``
        (reference style). Call it right after the GNB backward (gradients unscaled when a
        GradScaler is in use, and not clipped: clipping rescales the curvature), then zero the
        gradients before the next training step.
        """
        self._fold(positions, seed=False)

    @torch.no_grad()
    def init_hessian(self, positions: int | None = None) -> None:
        """h <- n * grad**2: seed the EMA with its first observation (the pre-first-step GNB pass).

        The reference starts from h = 0, so until the EMA fills (about 1/(1-beta2) = 100 updates,
        i.e. 1000 steps at k = 10) the denominators are far too small and nearly every coordinate is
        a full-``lr`` sign step. Seeding h with one estimate is what a bias-corrected EMA would give
        after its first update; the rule for every later update is the reference's.
        """
        self._fold(positions, seed=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, rho, wd = group["lr"], group["rho"], group["weight_decay"]
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
                ratio = (m.abs() / (rho * h + EPS)).clamp(max=1)
                p.addcmul_(m.sign(), ratio.to(p.dtype), value=-lr)
        return loss

    @torch.no_grad()
    def win_rate(self) -> float:
        """Share of coordinates whose step is *not* clipped: |m| < rho * h (reference: rho * bs * h_ref)."""
        total = 0
        unclipped = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                total += state["exp_avg"].numel()
                unclipped += int((state["exp_avg"].abs() < group["rho"] * state["hessian"]).sum())
        return unclipped / total if total else float("nan")

    @torch.no_grad()
    def hessian_norm(self) -> float:
        """L1 norm of the curvature EMA h over all parameters (the reference logs ``hessian_norm``)."""
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
    resumed run can draw the same labels). Returns ``(loss, n)``, n = positions averaged over: pass
    it to :meth:`SophiaG.update_hessian`.
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
