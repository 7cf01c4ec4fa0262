"""DoRA layers that never build an out×in matrix, saved and loaded in PEFT's own adapter format.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353)
re-parametrises a frozen weight W0 (out×in) as

    W' = m ⊙ (W0 + s·B·A) / n,      n = ‖W0 + s·B·A‖_row   (one norm per output row)

with A (r×in, Kaiming-uniform init), B (out×r, zero init), s = alpha/r (alpha/√r with rsLoRA,
Kalajdzievski 2023) and the magnitude vector m initialised to ‖W0‖_row, so a fresh adapter is the
identity. As the paper suggests (§4.3) and PEFT does, n is treated as a constant in backward
(detached). The layer output is

    y = (m/n) ⊙ (base(x) − b + s·B(A(x))) + b            (the bias b is not rescaled).

PEFT computes n by materialising W0 + s·B·A (and, for a 4-bit base, first dequantising all of W0)
in every forward. We expand the square instead; nothing larger than out×r or r×r is built:

    n² = ‖W0‖²_row + 2s·rowsum(B ⊙ (W0·Aᵀ)) + s²·rowsum((B·G) ⊙ B),     G = A·Aᵀ (r×r)

‖W0‖²_row is computed once when the layer is wrapped (row chunk by row chunk for bitsandbytes
4-bit/8-bit weights) and kept as a buffer. W0·Aᵀ comes from running the frozen base layer on the r
rows of A and subtracting its bias, so a bitsandbytes 4-bit layer uses its own kernel; there the r
rows are stacked under the tokens, [x; A], so W0 is dequantised once per forward, not twice. (An
8-bit layer's LLM.int8 GEMM would quantise A itself, so W0·Aᵀ is read from its int8 weight in row
chunks instead.) G, the row sums and n² are accumulated in fp32. In eval mode n is cached (PEFT's
cache is off by default) and reused only while A and B hold exactly the values n was computed from:
the cache keeps a copy of both and compares them (``torch.equal``) before each reuse, because
writes through ``.data`` (or by a kernel handed the raw pointer) change a tensor without bumping
its version counter. The copy costs r·(in+out) floats per layer in eval mode (freed by ``train()``),
the comparison reads 2·r·(in+out) values instead of the out·in of W0 (and one host sync on a GPU).
A norm computed under ``torch.inference_mode`` is cached as a normal tensor, so a later forward
with autograd can save it for backward.

Dropout follows PEFT: in training with p > 0 the adapter branch sees x' = dropout(x) and the output
is base(x) + (m/n − 1)·W0·x' + (m/n)·s·B·A·x' (one more base GEMM on x'); otherwise x' = x and the
formula above holds. PEFT recommends lora_dropout=0 with DoRA for that reason.

Adapters are written exactly as PEFT writes a DoRA adapter (adapter_config.json with
``use_dora: true``; adapter_model.safetensors with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector``), so
``PeftModel.from_pretrained`` loads a trkit adapter and ``load_adapter`` loads a PEFT one. trkit
adds its own ``trkit_manifest.json`` with file hashes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_ROW_CHUNK_ELEMENTS = 1 << 24  # 16M weights (64 MiB fp32) per chunk when computing row norms / merging


# --------------------------------------------------------------------------- base-layer kinds
def _bnb_kind(layer: nn.Module) -> str | None:
    """'4bit' / '8bit' for bitsandbytes Linear4bit / Linear8bitLt with quantised weights, else None."""
    if not type(layer).__module__.startswith("bitsandbytes"):
        return None
    weight_cls = type(layer.weight).__name__
    if weight_cls == "Params4bit":
        return "4bit"
    if weight_cls == "Int8Params" and layer.weight.dtype == torch.int8:
        return "8bit"
    return None


def _disable_bnb_cpu_repacking(layer: nn.Module) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU repacking of a Linear4bit (see shared/OFFLINE.md).

    bitsandbytes repacks 4-bit weights in place on any CPU no-grad/eval forward; gradients computed
    afterwards are silently wrong. Our norm computation runs the base layer under no_grad, so the
    flag must be off; a weight that was already repacked is converted back first.
    """
    if _bnb_kind(layer) != "4bit":
        return
    layer.support_avx512bf16_for_cpu = False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


def _iter_dense_row_chunks(layer: nn.Module, chunk_elements: int = _ROW_CHUNK_ELEMENTS):
    """Yield (row0, row1, W0[row0:row1] as a dense float tensor) without ever dequantising all of W0."""
    kind = _bnb_kind(layer)
    out_f, in_f = layer.out_features, layer.in_features
    if kind == "4bit":
        from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise

        state = layer.weight.quant_state
        absmax = state.absmax
        if state.nested:  # double quantisation: the per-block scales are themselves 8-bit blockwise
            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        block = state.blocksize
        # Chunks of whole rows start on a quantisation block when in_features is a multiple of the
        # block size (true of every Qwen3 projection). Otherwise dequantise in one piece:
        # bitsandbytes' CPU kernel (0.50) gives chunk-dependent results for such shapes.
        rows = max(1, chunk_elements // in_f) if in_f % block == 0 else out_f
        packed = layer.weight.data.reshape(-1).view(torch.uint8)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            e0, e1 = r0 * in_f, r1 * in_f
            chunk_state = QuantState(
                absmax=absmax[e0 // block : -(-e1 // block)],
                shape=torch.Size([r1 - r0, in_f]),
                code=state.code,
                blocksize=block,
                quant_type=state.quant_type,
                dtype=state.dtype,
            )
            yield r0, r1, dequantize_4bit(packed[e0 // 2 : (e1 + 1) // 2].view(-1, 1), chunk_state)
    elif kind == "8bit":
        from bitsandbytes.functional import int8_vectorwise_dequant

        # the row scales live on the weight until the first forward, then in the layer's state
        scales = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        rows = max(1, chunk_elements // in_f)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            yield r0, r1, int8_vectorwise_dequant(layer.weight.data[r0:r1], scales[r0:r1])
    else:
        rows = max(1, chunk_elements // in_f)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            yield r0, r1, layer.weight.data[r0:r1]


@torch.no_grad()
def weight_row_norm_sq(layer: nn.Module) -> torch.Tensor:
    """‖W0‖²_row in fp32, one row chunk at a time (dequantising chunk by chunk for bitsandbytes)."""
    out = torch.empty(layer.out_features, dtype=torch.float32, device=layer.weight.device)
    for r0, r1, w in _iter_dense_row_chunks(layer):
        out[r0:r1] = w.float().pow(2).sum(dim=1)
    return out


# --------------------------------------------------------------------------- the layer
class DoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, bitsandbytes Linear4bit or Linear8bitLt) with a DoRA adapter.

    Attribute names match PEFT's (``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``base_layer``)
    so state-dict keys translate one to one. Adapter parameters are fp32 (PEFT's default).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"DoRA wraps nn.Linear / bitsandbytes Linear4bit / Linear8bitLt, not {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        _disable_bnb_cpu_repacking(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # LoRA's / PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        # ‖W0‖²_row, computed once; not saved (it is a function of the base weights)
        self.register_buffer("weight_row_norm_sq", weight_row_norm_sq(base_layer), persistent=False)
        self.lora_magnitude_vector = nn.Parameter(self.weight_row_norm_sq.sqrt())  # = ‖W0 + s·B·A‖ with B = 0
        self.merged = False
        self._merge_state: dict = {}
        self._norm_cache: dict | None = None

    # PEFT's tuner layers expose the base layer's weight/bias; some model code reads them.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"

    def train(self, mode: bool = True):
        if mode:
            self._norm_cache = None  # weights may change while training (as PEFT clears its DoRA cache)
        return super().train(mode)

    def _norm_from_w0_at(self, w0_at: torch.Tensor) -> torch.Tensor:
        """n from (W0·Aᵀ)ᵀ (r×out): n² = ‖W0‖² + 2s·rowsum(B ⊙ W0Aᵀ) + s²·rowsum((B·G) ⊙ B), in fp32.

        Written as n² = ‖W0‖² + colsum(Bᵀ ⊙ (2s·W0Aᵀᵀ + s²·G·Bᵀ)): one addmm builds the r×out
        bracket, so the whole norm takes seven small ops (each op has a fixed cost: a kernel launch
        on a GPU, a thread wake-up on a busy CPU).
        """
        A = self.lora_A.weight.detach().float()
        Bt = self.lora_B.weight.detach().float().T  # r×out
        s = self.scaling
        with torch.autocast(A.device.type, enabled=False):
            gram = A @ A.T  # G = A·Aᵀ, r×r
            bracket = torch.addmm(w0_at.float(), gram, Bt, beta=2 * s, alpha=s * s)  # 2s·(W0·Aᵀ)ᵀ + s²·G·Bᵀ
            n_sq = (Bt * bracket).sum(dim=0).add_(self.weight_row_norm_sq)
        return n_sq.clamp_min_(0).sqrt_()

    @torch.no_grad()
    def _w0_at_from_chunks(self) -> torch.Tensor:
        """(W0·Aᵀ)ᵀ (r×out, fp32) from fp32 row chunks of W0 (dequantised chunk by chunk)."""
        A = self.lora_A.weight.detach().float()
        w0_at = torch.empty(self.r, self.out_features, dtype=torch.float32, device=A.device)
        for r0, r1, w in _iter_dense_row_chunks(self.base_layer):
            w0_at[:, r0:r1] = A @ w.float().T
        return w0_at

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B·A‖_row in fp32, from fp32 row chunks of W0 (used by merge and tests)."""
        return self._norm_from_w0_at(self._w0_at_from_chunks())

    def _base_outputs(self, x: torch.Tensor, x_dropped: torch.Tensor | None):
        """base(x), base(x') (when dropout is active) and (W0·Aᵀ)ᵀ without bias (r×out, fp32).

        A bitsandbytes 4-bit layer dequantises all of W0 on every call, so it gets one call on the
        stacked rows [x; x'; A]. A dense layer gets separate calls: a 16-row GEMM re-reads W0 once,
        which is cheaper than copying x into a stack and zero-filling the stack's gradient. An 8-bit
        layer's int8 matmul also quantises its input rows (LLM.int8), which would put about 1% error
        into W0·Aᵀ, so its int8 weight is read in row chunks instead.
        """
        kind = _bnb_kind(self.base_layer)
        bias = self.base_layer.bias
        A = self.lora_A.weight.detach().to(x.dtype)
        if kind != "4bit":
            base_out = self.base_layer(x)
            base_dropped = self.base_layer(x_dropped.to(x.dtype)) if x_dropped is not None else None
            if kind == "8bit":
                return base_out, base_dropped, self._w0_at_from_chunks()
            with torch.no_grad():
                w0_at = self.base_layer(A).float()
        else:
            rows = [x.reshape(-1, self.in_features)]
            if x_dropped is not None:
                rows.append(x_dropped.to(x.dtype).reshape(-1, self.in_features))
            rows.append(A)
            full = self.base_layer(torch.cat(rows))
            tokens = rows[0].shape[0]
            base_out = full[:tokens].view(*x.shape[:-1], self.out_features)
            base_dropped = full[tokens : 2 * tokens].view_as(base_out) if x_dropped is not None else None
            w0_at = full[-self.r :].detach().float()
        if bias is not None:
            w0_at = w0_at - bias.float()
        return base_out, base_dropped, w0_at

    def _cached_norm(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The eval-mode n if A and B still hold the values it was computed from, else None."""
        cache = self._norm_cache
        if cache is None or cache["dtype"] != dtype:
            return None
        A, B = self.lora_A.weight, self.lora_B.weight
        if cache["A"].device != A.device or not (torch.equal(cache["A"], A) and torch.equal(cache["B"], B)):
            return None
        return cache["n"]

    def _store_norm(self, dtype: torch.dtype, n: torch.Tensor) -> None:
        # inference_mode(False): normal tensors even when this forward runs under inference_mode,
        # so that a later forward with autograd can save the cached n for backward
        with torch.no_grad(), torch.inference_mode(False):
            self._norm_cache = {
                "dtype": dtype,
                "A": self.lora_A.weight.detach().clone(),
                "B": self.lora_B.weight.detach().clone(),
                "n": n.detach().clone(),
            }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        bias = self.base_layer.bias
        A = self.lora_A.weight
        dropout_active = self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0
        x_lora = x.to(A.dtype)
        if dropout_active:
            x_lora = self.lora_dropout(x_lora)

        n = None if self.training else self._cached_norm(x.dtype)
        if n is not None:  # eval mode, adapter unchanged since n was computed (generation)
            base_out = self.base_layer(x)
            base_dropped = None
        else:
            base_out, base_dropped, w0_at = self._base_outputs(x, x_lora if dropout_active else None)
            n = self._norm_from_w0_at(w0_at)  # detached: no gradient flows through the norm (§4.3)
            if not self.training:
                self._store_norm(x.dtype, n)

        scale = self.lora_magnitude_vector / n  # m/n
        # t = W0·x' + s·B·A·x', built in place in the adapter branch's own (fp32) output tensor;
        # s is applied to the r-wide A·x' rather than to the out-wide result (cheaper, same value)
        t = self.lora_B(self.lora_A(x_lora) * self.scaling)
        if base_dropped is None:
            t = t.add_(base_out)
            if bias is not None:
                t = t.sub_(bias)
                return torch.addcmul(bias, t, scale).to(base_out.dtype)
            return (t * scale).to(base_out.dtype)
        # PEFT's dropout semantics: base(x) + (m/n − 1)·W0·x' + (m/n)·s·B·A·x'
        t = t.add_(base_dropped)
        if bias is not None:
            t = t.sub_(bias)
            base_dropped = base_dropped - bias
        return torch.addcmul(base_out - base_dropped, t, scale).to(base_out.dtype)

    # ------------------------------------------------------------------ merge / unmerge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W' = (m/n) ⊙ (W0 + s·B·A)."""
        if self.merged:
            return
        n = self.weight_norm()
        factor = (self.lora_magnitude_vector.detach().float() / n).unsqueeze(1)
        A, B = self.lora_A.weight.detach().float(), self.lora_B.weight.detach().float()
        kind = _bnb_kind(self.base_layer)
        if kind is None:
            weight = self.base_layer.weight
            for r0, r1, w in _iter_dense_row_chunks(self.base_layer):
                merged = factor[r0:r1] * (w.float() + self.scaling * (B[r0:r1] @ A))
                weight.data[r0:r1] = merged.to(weight.dtype)
            self._merge_state = {"norm": n}
        else:
            # bitsandbytes: dequantise, merge, re-quantise (lossy, as in PEFT); keep the original
            # quantised weight so unmerge restores it exactly.
            merged = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=A.device)
            for r0, r1, w in _iter_dense_row_chunks(self.base_layer):
                merged[r0:r1] = factor[r0:r1] * (w.float() + self.scaling * (B[r0:r1] @ A))
            self._merge_state = {"norm": n, "weight": self.base_layer.weight}
            if kind == "8bit":
                # after its first forward a Linear8bitLt reads its int8 weight and row scales from
                # layer.state (CB, SCB), not from the weight: keep the original's to restore them
                state = self.base_layer.state
                self._merge_state["int8_state"] = (state.CB, state.SCB)
            self.base_layer.weight = _quantize_like(self.base_layer.weight, merged)
            _disable_bnb_cpu_repacking(self.base_layer)
        self._norm_cache = None
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W0 = W'·(n/m) − s·B·A with the n saved at merge time (exact for 4/8-bit)."""
        if not self.merged:
            return
        if "weight" in self._merge_state:
            self.base_layer.weight = self._merge_state["weight"]
            if "int8_state" in self._merge_state:
                # a forward while merged moved the merged weight's CB/SCB into layer.state; left
                # there, the next forward would use them and copy the merged int8 data into the
                # original weight (PEFT resets this state on unmerge too)
                state = self.base_layer.state
                state.CB, state.SCB = self._merge_state["int8_state"]
        else:
            factor = (self.lora_magnitude_vector.detach().float() / self._merge_state["norm"]).unsqueeze(1)
            A, B = self.lora_A.weight.detach().float(), self.lora_B.weight.detach().float()
            weight = self.base_layer.weight
            for r0, r1, w in _iter_dense_row_chunks(self.base_layer):
                restored = w.float() / factor[r0:r1] - self.scaling * (B[r0:r1] @ A)
                weight.data[r0:r1] = restored.to(weight.dtype)
        self._merge_state = {}
        self._norm_cache = None
        self.merged = False


def _quantize_like(weight: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes weight with ``weight``'s quantisation settings holding ``dense``."""
    import bitsandbytes as bnb

    device = weight.device
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        new = bnb.nn.Params4bit(
            dense.to(state.dtype).cpu(),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=weight.quant_storage,
        )
    else:
        new = bnb.nn.Int8Params(dense.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    return new.to(device)


# --------------------------------------------------------------------------- model-level API
def _matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the whole module name; a list holds name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """Every DoRA layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def apply_dora(
    model: nn.Module,
    target_modules: str | list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Wrap every linear layer whose name matches ``target_modules`` (PEFT's matching rule) in DoRA.

    As PEFT's ``get_peft_model`` does, every other parameter of the model is frozen; only A, B and m
    train. Returns ``model`` (changed in place).
    """
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError("target_modules is empty; pass e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty; pass e.g. ['q_proj', 'v_proj']")
    if dora_layers(model):
        raise ValueError("the model already has DoRA layers; call apply_dora once (or load_adapter on a fresh model)")
    targets = [(name, m) for name, m in model.named_modules() if name and _matches(name, target_modules)]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no module matches target_modules={target_modules!r}; this model's linear layers are named {linear}")
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name} matches target_modules but is a {type(module).__name__}; DoRA here wraps nn.Linear and "
                "bitsandbytes Linear4bit/Linear8bitLt only: narrow target_modules"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DoRALinear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora))
    model._trkit_dora_config = {
        "target_modules": target_modules,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
    }
    return model


def _require_layers(model: nn.Module) -> dict[str, DoRALinear]:
    layers = dora_layers(model)
    if not layers:
        raise ValueError("the model has no DoRA layers: call trkit.dora.apply_dora (or load_adapter) first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Merge every DoRA layer into its base weight (forward then runs the base layer alone)."""
    for layer in _require_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` on every DoRA layer."""
    for layer in _require_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each DoRA wrapper by its (merged) base layer: a plain model to save or export."""
    for name, layer in _require_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "_trkit_dora_config"):
        del model._trkit_dora_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's file key names."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _require_layers(model).items():
        key = PEFT_PREFIX + name
        out[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach()
        out[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return out


def _peft_config_dict(model: nn.Module) -> dict:
    from peft import LoraConfig

    cfg = getattr(model, "_trkit_dora_config", None)
    if cfg is None:
        raise ValueError("this model's DoRA layers were not created by trkit.dora.apply_dora/load_adapter; re-create them with apply_dora")
    layers = dora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapter is merged into the base weights; call trkit.dora.unmerge(model) before save_adapter")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    task_type = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        use_rslora=cfg["use_rslora"],
        target_modules=cfg["target_modules"],
        use_dora=True,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=name_or_path,
        inference_mode=True,
    )
    out = config.to_dict()
    for k, v in out.items():  # JSON has no sets (PEFT stores target_modules as a set)
        if isinstance(v, set):
            out[k] = sorted(v)
    return out


def save_adapter(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the adapter in PEFT's format (+ trkit_manifest.json), atomically; returns the directory."""
    from safetensors.torch import save_file

    from trkit.artifacts import atomic_directory, atomic_write_json, write_manifest

    config = _peft_config_dict(model)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG_NAME, config)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_manifest(
            tmp,
            stage="dora",
            format="peft-lora-dora",
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            target_modules=config["target_modules"],
            n_layers=len(tensors) // 3,
            n_parameters=sum(t.numel() for t in tensors.values()),
        )
    return directory


_UNSUPPORTED = {
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trained token rows",
    "layers_to_transform": "a layer subset",
    "layer_replication": "layer replication",
    "exclude_modules": "excluded modules",
}


def read_adapter_config(directory: str | Path) -> dict:
    """Read and check a PEFT adapter_config.json for what trkit's DoRA layers can load."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a directory written by trkit.dora.save_adapter or PEFT's save_pretrained")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or not cfg.get("use_dora"):
        raise ValueError(
            f"{path} is a {cfg.get('peft_type')} adapter with use_dora={cfg.get('use_dora')}; trkit.dora loads DoRA "
            "adapters only (load others with peft.PeftModel.from_pretrained)"
        )
    if cfg.get("fan_in_fan_out") or cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(f"{path}: fan_in_fan_out / bias training are not supported by trkit.dora; use PEFT for this adapter")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{path} uses {key} ({what}), which trkit.dora does not implement; load it with peft.PeftModel.from_pretrained")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path} has no target_modules")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a DoRA adapter saved by trkit or by PEFT into ``model``.

    A model without DoRA layers is wrapped first (apply_dora with the file's settings); one that
    already has them must have matching ranks and alphas. A trkit manifest, when present, is
    verified (hashes) first.
    """
    from safetensors.torch import load_file

    from trkit.artifacts import MANIFEST_NAME, read_manifest

    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        read_manifest(directory, verify=True)
    cfg = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path} not found (trkit reads safetensors only, never pickled .bin files)")
    target = cfg["target_modules"]
    if not dora_layers(model):
        apply_dora(model, target, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0), use_rslora=cfg.get("use_rslora", False))
    layers = dora_layers(model)
    tensors = load_file(str(weights_path))
    expected = set()
    for name, layer in layers.items():
        if (layer.r, float(layer.lora_alpha), layer.use_rslora) != (cfg["r"], float(cfg["lora_alpha"]), cfg.get("use_rslora", False)):
            raise ValueError(
                f"{name} has r={layer.r}, alpha={layer.lora_alpha}, rslora={layer.use_rslora} but {directory} has "
                f"r={cfg['r']}, alpha={cfg['lora_alpha']}, rslora={cfg.get('use_rslora', False)}: load into a fresh model"
            )
        if layer.merged:
            raise ValueError(f"{name} is merged; call trkit.dora.unmerge(model) before load_adapter")
        key = PEFT_PREFIX + name
        for suffix, param in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight), ("lora_magnitude_vector", layer.lora_magnitude_vector)):
            full = f"{key}.{suffix}"
            expected.add(full)
            if full not in tensors:
                raise ValueError(f"{weights_path} has no tensor {full}: the adapter was trained on a different model or target_modules")
            value = tensors[full]
            if value.shape != param.shape:
                raise ValueError(f"{full}: shape {tuple(value.shape)} in the file, {tuple(param.shape)} in the model: wrong base model?")
            with torch.no_grad():
                param.copy_(value.to(param.device, param.dtype))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{weights_path} holds tensors for modules this model does not wrap, e.g. {unexpected[:3]}: wrong base model?")
    return model
