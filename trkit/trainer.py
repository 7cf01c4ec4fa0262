"""Training loops that drive SophiaG's Gauss-Newton-Bartlett (GNB) Hessian pass: the HF Trainer and a plain loop.

SophiaG (:mod:`trkit.sophia`) needs, besides its ordinary ``step()``, a second kind of pass every
``k`` optimizer steps (Liu et al. 2023, Algorithm 2; reference ``train_sophiag.py``): a fresh
forward on a batch, labels sampled from the model's own softmax, mean cross-entropy, backward, then
``optimizer.update_hessian(n)``, then zeroed gradients. This module owns *when* and *how* that pass
runs, once, for every loop trkit has:

* :func:`run_gnb_pass` - one pass on one batch. It hands the optimizer the number of positions n the
  GNB loss averaged over, and SophiaG folds ``n * g_hat**2`` (the unbiased per-position estimate) into
  its EMA, so passes over batches of different sizes stay on one scale. Under fp16 with a GradScaler
  the backward is scaled and the gradients are unscaled by hand before the Hessian sees them
  (``scaler.unscale_`` would mark the optimizer as unscaled until the next ``scaler.update()`` and
  make the next training step fail); a pass whose gradients are not finite (an fp16 overflow) is
  skipped, as GradScaler skips a step, and leaves h as it was. The GNB gradient is **not clipped**:
  clipping to ``max_grad_norm`` multiplies h by ``(max_grad_norm / ||g_hat||)**2``. The reference
  clips it too, but there it averages a whole 480 x 1024-token batch and its norm stays far below
  the threshold; one micro-batch of ours does not (issue 9 measured ||g_hat|| = 8.7-9.7 for a full
  SmolLM2-135M fine-tune on 127 positions: h x 0.011-0.013 at ``max_grad_norm=1``).
* **Deterministic forward** (:func:`curvature_forward`, on by default): dropout modules run with
  p = 0, HF attention dropout is 0 and NEFTune noise is suspended, for the forward *and* the backward
  (gradient checkpointing recomputes the forward inside the backward). The curvature Sophia needs
  is that of the model being trained, not of one noisy draw of it. The model stays in **train mode**:
  ``model.eval()`` would switch off Hugging Face gradient checkpointing (active only while
  ``module.training``; the GNB backward would then hold every layer's activations) and send
  bitsandbytes 4-bit layers on CPU down the path that repacks their weights. Measured
  (``bench_sophia.py --curvature-probe`` -> benchmarks/results/sophia_curvature.json; SmolLM2-135M
  LoRA r=8 after 30 AdamW steps, lora_dropout 0.1, NEFTune alpha 5, 24 batches of 2 x 64 tokens,
  same label seeds): with the noise on, the mean estimate's total moved by +1.8% (lora_A -2.6%,
  lora_B +2.0%) and each coordinate by a median 18% (two label seeds without noise differ by a
  median 29%); under curvature_forward it equals the eval-mode estimate exactly. So the noise is a
  small bias here but an extra source of variance with no benefit, and switching it off costs
  nothing.
* :class:`HessianSchedule` - the cadence. A pass is due when ``global_step % k == 0``: the global
  step counts finished optimizer steps, so this is the reference's "after step k-1, 2k-1, ..." and a
  run resumed from a checkpoint keeps its phase (the Hessian EMA itself is optimizer state and is
  saved with it). At step 0 it runs one pass *before* the first update (``warm_start``, on by
  default) that seeds h, because with h = 0 every coordinate takes a full-``lr`` sign step; if that
  pass is skipped (fp16 overflow) the next successful one seeds h instead. Labels are drawn from a
  generator seeded by ``(seed, global_step)``, so a resumed run samples the same labels as an
  uninterrupted one. After each pass it records the win rate (share of coordinates not clipped; keep
  it in 0.1-0.5 by tuning rho) and the Hessian norm.
* :class:`TrkitTrainer` - a ``transformers.Trainer`` that runs the schedule whenever its optimizer
  is a SophiaG (any other optimizer trains as usual, so the later stages, distillation and QLoRA,
  subclass this one trainer) and adds ``sophia/*`` numbers to its logs.

The pass reuses the first micro-batch of the step it precedes, as the reference does (its pass runs
on the batch it has just fetched for the next step). A loop whose loss is not "forward, then logits"
(sequence-chunked cross-entropy from hidden states, so full-vocabulary logits never exist) passes
``loss_fn(model, inputs, generator) -> (loss, n_positions)``: it must return the mean cross-entropy
against labels it samples from the model's own softmax with ``generator`` (for example
:func:`trkit.sophia.gauss_newton_bartlett_loss` per chunk, loss = sum of chunk sums / total n).

Plain PyTorch loop::

    schedule = HessianSchedule(optimizer, k=10, seed=0)
    for global_step, batch in enumerate(batches):
        schedule.maybe_update(model, batch, global_step, scaler=scaler)   # GNB pass when due
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import Trainer

from trkit.neftune import suspend_neftune
from trkit.sophia import SophiaG, _check_positions, gauss_newton_bartlett_loss

# Batch keys a causal LM's forward takes for the GNB pass; labels are never passed (we sample them).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
# loss_fn(model, inputs, generator) -> (GNB loss, label positions it averaged over)
GNBLossFn = Callable[[nn.Module, Mapping[str, Any], torch.Generator], "tuple[torch.Tensor, int]"]
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class GNBStats:
    """What one GNB pass did."""

    global_step: int
    positions: int  # label positions the GNB loss averaged over (n in h <- beta2 h + (1-beta2) n g^2)
    loss: float  # the GNB loss (cross-entropy against sampled labels)
    initialized: bool  # True for the pass that seeded h
    skipped: bool = False  # True when the gradients were not finite (fp16 overflow) and h was left as it was
    win_rate: float = float("nan")
    hessian_norm: float = float("nan")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    # AcceleratedOptimizer subclasses torch.optim.Optimizer itself, so unwrap by attribute, not by type.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _logits_of(outputs: Any) -> torch.Tensor:
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


@contextlib.contextmanager
def curvature_forward(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes its noiseless function while staying in train mode.

    Dropout modules get p = 0, modules with a float ``attention_dropout`` (Hugging Face attention)
    get 0, transformers' NEFTune hook (``neftune_noise_alpha``) gets alpha 0 and trkit's NEFTune is
    suspended; everything is restored on exit. Train mode is kept on purpose: gradient checkpointing
    and bitsandbytes' training path depend on it (see the module docstring). Wrap the forward and
    the backward (checkpointed layers re-run their forward during the backward).
    """
    saved: list[tuple[nn.Module, str, float]] = []

    def zero(module: nn.Module, name: str) -> None:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, 0.0)

    try:
        for module in model.modules():
            if isinstance(module, _DROPOUT_TYPES) and module.p:
                zero(module, "p")
            attention_dropout = getattr(module, "attention_dropout", None)
            if isinstance(attention_dropout, float) and attention_dropout:
                zero(module, "attention_dropout")
            alpha = getattr(module, "neftune_noise_alpha", None)
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha:
                zero(module, "neftune_noise_alpha")
        with suspend_neftune(model):
            yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _default_gnb_loss(pick: Callable[[Mapping[str, Any]], dict]) -> GNBLossFn:
    def loss_fn(model, batch, generator):
        logits = _logits_of(model(**pick(batch)))
        return gauss_newton_bartlett_loss(logits, batch.get("labels"), attention_mask=batch.get("attention_mask"),
                                          generator=generator)
    return loss_fn


def run_gnb_pass(
    model: nn.Module,
    inputs: Mapping[str, Any],
    optimizer: SophiaG,
    *,
    initialize: bool = False,
    scaler: Any = None,
    generator: torch.Generator | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    model_inputs: Callable[[Mapping[str, Any]], dict] | None = None,
    loss_fn: GNBLossFn | None = None,
    deterministic: bool = True,
    global_step: int = 0,
) -> GNBStats:
    """One GNB pass on ``inputs``: sampled-label mean CE, backward, update (or seed) h with n, zero grads.

    Gradients must be empty on entry (call it between optimizer steps); they are empty on return.
    ``loss_fn(model, inputs, generator) -> (loss, n)`` replaces the default "forward, then
    :func:`~trkit.sophia.gauss_newton_bartlett_loss` on the logits" (``model_inputs`` picks that
    forward's arguments, default :data:`MODEL_INPUT_KEYS`). ``forward_context`` (autocast) wraps the
    loss; ``deterministic`` wraps loss and backward in :func:`curvature_forward`. The gradient is
    never clipped (clipping would rescale the curvature).
    """
    if not isinstance(optimizer, SophiaG):
        raise TypeError(f"run_gnb_pass needs a trkit.sophia.SophiaG optimizer, got {type(optimizer).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = [p.grad.detach().abs().amax() for p in params if p.grad is not None]
    if held and bool(torch.stack([h.float() for h in held]).amax() > 0):  # one device sync, not one per tensor
        raise RuntimeError("run_gnb_pass called with gradients already accumulated: run it before the "
                           "training backward of a step (or after optimizer.zero_grad())")
    if loss_fn is None:
        loss_fn = _default_gnb_loss(model_inputs or (lambda b: {k: v for k, v in b.items() if k in MODEL_INPUT_KEYS}))
    scale = None
    with curvature_forward(model) if deterministic else contextlib.nullcontext():
        with forward_context():
            loss, n = loss_fn(model, inputs, generator)
        try:
            n = _check_positions(n)
        except ValueError as error:
            raise ValueError(f"the GNB loss_fn must return (loss, n_positions): {error}") from None
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
            (loss * scale).backward()
        else:
            loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        if scale is not None:
            for g in grads:
                g.mul_(1.0 / scale)
        # One non-finite estimate would stay in the EMA for good: skip it (an fp16 overflow, or a diverged bf16 pass).
        skipped = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if not skipped:
        optimizer.init_hessian(n) if initialize else optimizer.update_hessian(n)
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return GNBStats(global_step=global_step, positions=n, loss=float(loss.detach()), initialized=initialize and not skipped,
                    skipped=skipped)


@dataclass
class HessianSchedule:
    """When to run the GNB pass (every ``k`` optimizer steps, from the global step) and its bookkeeping.

    Args:
        optimizer: the SophiaG (or accelerate's wrapper around it).
        k: Hessian interval (10 in the paper).
        warm_start: seed h with the pass before the first step (see :mod:`trkit.sophia`); if that pass
            is skipped (fp16 overflow), the next successful pass seeds it.
        seed: seeds the label sampler together with the global step.
        deterministic: run the pass without dropout and NEFTune noise (:func:`curvature_forward`).
    """

    optimizer: Any
    k: int = 10
    warm_start: bool = True
    seed: int = 0
    deterministic: bool = True
    history: list[GNBStats] = field(default_factory=list)
    _last_step: int | None = field(default=None, repr=False)
    _seed_pending: bool = field(default=False, repr=False)  # the warm-start pass was skipped

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"Hessian interval k must be >= 1, got {self.k}")
        if not isinstance(unwrap_optimizer(self.optimizer), SophiaG):
            raise TypeError("HessianSchedule drives a trkit.sophia.SophiaG; got "
                            f"{type(unwrap_optimizer(self.optimizer)).__name__}")

    def due(self, global_step: int) -> bool:
        """True when a pass belongs before optimizer step ``global_step + 1`` and has not run yet."""
        if self._last_step == global_step:
            return False
        if global_step == 0:
            return self.warm_start
        return global_step % self.k == 0

    def generator(self, device: torch.device | str, global_step: int) -> torch.Generator:
        """The label sampler of the pass at ``global_step``: the same draws after a resume."""
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + global_step)

    def maybe_update(self, model: nn.Module, inputs: Mapping[str, Any], global_step: int, *,
                     loss_fn: GNBLossFn | None = None, **kwargs) -> GNBStats | None:
        """Run the GNB pass on ``inputs`` if one is due at ``global_step``; return its stats (or None).

        ``loss_fn(model, inputs, generator) -> (loss, n_positions)`` replaces the default forward +
        GNB loss (see :func:`run_gnb_pass`); other keyword arguments go to :func:`run_gnb_pass`
        (``scaler``, ``forward_context``, ``model_inputs``).
        """
        if not self.due(global_step):
            return None
        optimizer = unwrap_optimizer(self.optimizer)
        device = next(p.device for g in optimizer.param_groups for p in g["params"])
        initialize = self.warm_start and (global_step == 0 or self._seed_pending)
        stats = run_gnb_pass(
            model, inputs, optimizer, initialize=initialize, generator=self.generator(device, global_step),
            loss_fn=loss_fn, deterministic=self.deterministic, global_step=global_step, **kwargs,
        )
        self._seed_pending = initialize and stats.skipped
        self._last_step = global_step
        stats.win_rate = optimizer.win_rate()
        stats.hessian_norm = optimizer.hessian_norm()
        self.history.append(stats)
        return stats

    def log_dict(self) -> dict[str, float]:
        """The latest pass as ``sophia/*`` numbers for a logger."""
        if not self.history:
            return {}
        last = self.history[-1]
        return {"sophia/win_rate": last.win_rate, "sophia/hessian_norm": last.hessian_norm,
                "sophia/gnb_loss": last.loss, "sophia/gnb_positions": float(last.positions),
                "sophia/gnb_skipped": float(sum(s.skipped for s in self.history))}


@dataclass
class SophiaConfig:
    """SophiaG settings for :class:`TrkitTrainer`; ``lr`` and ``weight_decay`` come from TrainingArguments.

    ``args.max_grad_norm`` clips the training gradient only, never the GNB gradient.
    """

    rho: float = 0.04
    betas: tuple[float, float] = (0.965, 0.99)
    k: int = 10
    warm_start: bool = True
    deterministic_gnb: bool = True  # GNB pass without dropout / NEFTune noise (trkit.trainer.curvature_forward)

    def as_dict(self) -> dict:
        return asdict(self)


class TrkitTrainer(Trainer):
    """``transformers.Trainer`` + SophiaG's GNB pass every ``k`` steps (only when the optimizer is SophiaG).

    Pass ``sophia=SophiaConfig(...)`` to have the trainer build a SophiaG (decay / no-decay groups as
    the Trainer does for AdamW, ``lr = args.learning_rate``, ``weight_decay = args.weight_decay``), or
    pass your own SophiaG in ``optimizers=`` (then ``SophiaConfig()`` defaults give k etc.). With
    ``sophia=None`` and any other optimizer it is the plain Trainer. The pass runs on the first
    micro-batch of a due step, before that micro-batch's training backward (the reference uses the
    next training batch too), inside the Trainer's autocast, with the Trainer's GradScaler when
    training in fp16, in train mode without dropout and NEFTune noise (``SophiaConfig.deterministic_gnb``).

    Subclasses with extra batch keys (teacher logits for distillation) override :meth:`gnb_model_inputs`;
    a loss that never materialises full logits goes in ``gnb_loss_fn`` (see :func:`run_gnb_pass`).
    """

    def __init__(self, *args, sophia: SophiaConfig | None = None, gnb_loss_fn: GNBLossFn | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sophia = sophia  # None: the optimizer is args.optim (or optimizers=); a SophiaG there still gets its GNB pass
        self.gnb_loss_fn = gnb_loss_fn
        self.hessian_schedule: HessianSchedule | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.sophia is not None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = (SophiaG, {"lr": self.args.learning_rate, "rho": self.sophia.rho,
                                                       "betas": tuple(self.sophia.betas)})
        return super().create_optimizer(model)

    def gnb_model_inputs(self, inputs: Mapping[str, Any]) -> dict:
        """The forward arguments of the GNB pass (labels are sampled, never passed)."""
        return {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}

    def _schedule(self) -> HessianSchedule | None:
        optimizer = unwrap_optimizer(self.optimizer)
        if not isinstance(optimizer, SophiaG):
            return None
        if self.hessian_schedule is None or unwrap_optimizer(self.hessian_schedule.optimizer) is not optimizer:
            config = self.sophia or SophiaConfig()
            self.hessian_schedule = HessianSchedule(optimizer, k=config.k, warm_start=config.warm_start,
                                                    seed=self.args.seed, deterministic=config.deterministic_gnb)
        return self.hessian_schedule

    def training_step(self, model, inputs, num_items_in_batch=None):
        schedule = self._schedule()
        if schedule is not None and schedule.due(self.state.global_step):
            model.train()
            prepared = self._prepare_inputs(inputs)
            schedule.maybe_update(
                model, prepared, self.state.global_step,
                scaler=getattr(self.accelerator, "scaler", None),
                forward_context=self.compute_loss_context_manager,
                model_inputs=self.gnb_model_inputs,
                loss_fn=self.gnb_loss_fn,
            )
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.hessian_schedule is not None and not any(k.startswith("eval_") for k in logs):
            logs.update({k: v for k, v in self.hessian_schedule.log_dict().items() if not math.isnan(v)})
        super().log(logs, start_time)
