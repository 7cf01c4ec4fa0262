"""NEFTune: uniform noise on the input embeddings while training, scaled by each sample's own length.

NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning",
arXiv:2310.05914) adds, in training only, to the embedding e[i, t] of token t of sample i

    e'[i, t] = e[i, t] + mask[i, t] · α / √(L_i · d) · u[i, t],      u ~ Uniform(−1, 1)^d

with d the embedding width and L_i = Σ_t mask[i, t] the sample's unpadded length. This is the
paper's own code (noise times the attention mask, per-sample lengths). transformers' built-in hook
(``neftune_noise_alpha``) instead uses the padded length for every sample and also noises pad
positions, so a short sample in a long batch gets less noise than the paper prescribes; without
padding the two coincide (and draw the same random numbers for the same seed).

How: a forward pre-hook on the model captures ``attention_mask`` from its call; a forward hook on
the input-embedding module (``model.get_input_embeddings()``, so PEFT-wrapped, 4-bit,
trkit-DoRA models and trained new-token rows all work) adds the noise to its output when that module
is in training mode (and not inside ``suspend_neftune(model)``, which SophiaG's Hessian pass uses).
Without a mask (or when the embedding is called on its own) every position counts (L_i = padded
length). Use it as a context manager ``with neftune(model, alpha): ...``, as a
handle (``activate_neftune(...).remove()``) or as a ``NEFTuneCallback(alpha)`` for the
transformers Trainer, which is active between train begin and train end only.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator

import torch
from torch import nn

_ACTIVE_ATTR = "_trkit_neftune"


class NEFTune:
    """Active NEFTune hooks on one model; ``remove()`` takes them all off (outputs are then unchanged)."""

    def __init__(self, model: nn.Module, alpha: float):
        if not alpha > 0:
            raise ValueError(f"NEFTune alpha must be positive (the paper uses 5, 10 or 15), got {alpha}")
        if getattr(model, _ACTIVE_ATTR, None) is not None:
            raise ValueError("NEFTune is already active on this model; remove the first one before activating another")
        embeddings = model.get_input_embeddings()
        if embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings() returned None)")
        if getattr(embeddings, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                "transformers' own NEFTune hook is active on this model (neftune_noise_alpha is set): noise would be "
                "added twice; set TrainingArguments(neftune_noise_alpha=None) when using trkit.neftune"
            )
        self.alpha = float(alpha)
        self.model = model
        self.embeddings = embeddings
        self._mask: torch.Tensor | None = None
        self._suspended = 0  # > 0 inside suspend_neftune(): no noise even in training mode
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
        self._mask_position = names.index("attention_mask") if "attention_mask" in names else None
        self._handles = [
            model.register_forward_pre_hook(self._capture_mask, with_kwargs=True),
            model.register_forward_hook(self._release_mask, always_call=True),
            embeddings.register_forward_hook(self._add_noise),
        ]
        setattr(model, _ACTIVE_ATTR, self)

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _release_mask(self, module, args, output):
        self._mask = None

    def _add_noise(self, module, args, output):
        if not module.training or self._suspended:
            return None
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise ValueError(f"NEFTune expects embeddings of shape (batch, sequence, dim), got {type(output).__name__} "
                             f"{tuple(getattr(output, 'shape', ()))}")
        batch, length, dim = output.shape
        noise = torch.zeros_like(output).uniform_(-1, 1)
        mask = self._mask
        if mask is None:
            return output + noise * (self.alpha / math.sqrt(length * dim))
        if mask.shape != (batch, length):
            raise ValueError(
                f"NEFTune needs the 2-D attention_mask (batch, sequence) = {(batch, length)} of this call, got "
                f"{tuple(mask.shape)}; pass a padding mask of 1s and 0s (not a 4-D attention bias)"
            )
        mask = mask.to(device=output.device, dtype=torch.float32)
        lengths = mask.sum(dim=1).clamp_min(1.0)  # L_i; a fully padded row gets no noise anyway
        scale = mask * (self.alpha / torch.sqrt(lengths * dim)).unsqueeze(1)  # (batch, sequence)
        return output + noise * scale.unsqueeze(-1).to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None
        if getattr(self.model, _ACTIVE_ATTR, None) is self:
            delattr(self.model, _ACTIVE_ATTR)


def activate_neftune(model: nn.Module, alpha: float) -> NEFTune:
    """Add NEFTune noise to ``model``'s input embeddings in training mode; returns the removable handle."""
    return NEFTune(model, alpha)


@contextlib.contextmanager
def neftune(model: nn.Module, alpha: float) -> Iterator[NEFTune]:
    """``with neftune(model, 5.0): train...`` — noise inside the block (training mode only), none after."""
    handle = NEFTune(model, alpha)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def suspend_neftune(model: nn.Module) -> Iterator[None]:
    """No trkit NEFTune noise inside the block on ``model`` or any submodule, in training mode too.

    The hooks stay attached and training mode is untouched (a Hessian pass keeps gradient checkpointing
    that way); trkit.trainer uses it so the GNB curvature is that of the noiseless model.
    """
    handles = [h for m in model.modules() if isinstance(h := getattr(m, _ACTIVE_ATTR, None), NEFTune)]
    for handle in handles:
        handle._suspended += 1
    try:
        yield
    finally:
        for handle in handles:
            handle._suspended -= 1


def _make_callback_class():
    from transformers import TrainerCallback

    class NEFTuneCallback(TrainerCallback):
        """transformers Trainer callback: NEFTune from ``on_train_begin`` to ``on_train_end``.

        Evaluation inside training runs in eval mode, so it gets no noise either. Do not also set
        ``TrainingArguments.neftune_noise_alpha`` (that is transformers' padded-length variant).
        """

        def __init__(self, alpha: float):
            if not alpha > 0:
                raise ValueError(f"NEFTune alpha must be positive, got {alpha}")
            self.alpha = float(alpha)
            self.handle: NEFTune | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if getattr(args, "neftune_noise_alpha", None):
                raise ValueError("TrainingArguments.neftune_noise_alpha is set as well as NEFTuneCallback: use one of them")
            if model is None:
                raise ValueError("NEFTuneCallback needs the Trainer to pass the model to its callbacks")
            self.handle = NEFTune(model, self.alpha)

        def on_train_end(self, args, state, control, **kwargs):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    return NEFTuneCallback


_callback_class = None


def __getattr__(name: str):
    # NEFTuneCallback subclasses transformers' TrainerCallback; build it on first use so that
    # importing trkit.neftune does not import transformers' trainer machinery.
    global _callback_class
    if name == "NEFTuneCallback":
        if _callback_class is None:
            _callback_class = _make_callback_class()
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
