"""trkit.dora against PEFT's DoRA: same A, B, m -> same outputs, gradients, files and merged weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from trkit import dora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fp32 tolerances (the two implementations sum in different orders; a 2-layer model compounds it)
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_config():
    from transformers import Qwen3Config

    # attention_bias=True so the q/k/v/o projections carry a bias (the unscaled-bias path is tested)
    return Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_qwen3")
    Qwen3ForCausalLM(tiny_config()).save_pretrained(out)
    return out


_BASES: dict = {}


def load_base(tiny_dir, kind: str, dtype=torch.float32):
    """A fresh copy of the tiny model (loaded from disk once per kind and dtype, then deep-copied).

    ``dtype`` is the dtype of the unquantised weights and, for 4-bit, the compute dtype."""
    key = (str(tiny_dir), kind, dtype)
    if key not in _BASES:
        _BASES[key] = _load_from_disk(tiny_dir, kind, dtype)
    return copy.deepcopy(_BASES[key])


def _load_from_disk(tiny_dir, kind: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "linear":
        return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    if kind == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant, device_map="cpu", dtype=dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant, device_map="cpu", dtype=dtype)
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the CPU repacking trap (shared/OFFLINE.md), for PEFT's copy too
    return model


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def make_ours(tiny_dir, kind="linear", r=4, alpha=8, dropout=0.0, use_rslora=False, seed=0, dtype=torch.float32):
    """A trkit-DoRA model with non-trivial (random) A, B and m."""
    ours = dora.apply_dora(load_base(tiny_dir, kind, dtype), TARGETS, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dora.dora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=gen))
    return ours


def make_pair(tiny_dir, kind="linear", r=4, alpha=8, dropout=0.0, use_rslora=False, seed=0, dtype=torch.float32):
    """A trkit-DoRA model and a PEFT-DoRA model with identical, non-trivial A, B, m."""
    from peft import LoraConfig, get_peft_model

    ours = make_ours(tiny_dir, kind, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, seed=seed, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, target_modules=TARGETS, use_dora=True)
    theirs = get_peft_model(load_base(tiny_dir, kind, dtype), config)
    with torch.no_grad():
        for name, layer in dora.dora_layers(ours).items():
            p = peft_layer(theirs, name)
            p.lora_A["default"].weight.copy_(layer.lora_A.weight)
            p.lora_B["default"].weight.copy_(layer.lora_B.weight)
            p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return ours, theirs


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    ids[1, :2] = 0
    return ids, mask


def loss_of(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.shape[-1])
    return logits, (logits * weights).sum()


def assert_same_adapter_grads(ours, theirs):
    worst = {"A": 0.0, "B": 0.0, "m": 0.0}
    for name, layer in dora.dora_layers(ours).items():
        p = peft_layer(theirs, name)
        pairs = {"A": (layer.lora_A.weight.grad, p.lora_A["default"].weight.grad),
                 "B": (layer.lora_B.weight.grad, p.lora_B["default"].weight.grad),
                 "m": (layer.lora_magnitude_vector.grad, p.lora_magnitude_vector["default"].weight.grad)}
        for key, (g_ours, g_theirs) in pairs.items():
            assert g_ours is not None and g_theirs is not None, (name, key)
            torch.testing.assert_close(g_ours, g_theirs, **GRAD_TOL, msg=lambda m: f"{name} grad {key}: {m}")
            worst[key] = max(worst[key], (g_ours - g_theirs).abs().max().item() / g_theirs.abs().max().item())
    return worst


# --------------------------------------------------------------------------- forward / backward vs PEFT
@pytest.mark.parametrize("kind,use_rslora", [("linear", False), ("linear", True), ("4bit", False), ("8bit", False)])
def test_outputs_and_gradients_match_peft(tiny_dir, kind, use_rslora):
    ours, theirs = make_pair(tiny_dir, kind, use_rslora=use_rslora)
    ours.train(), theirs.train()
    ids, mask = batch()
    logits_ours, loss_ours = loss_of(ours, ids, mask)
    logits_theirs, loss_theirs = loss_of(theirs, ids, mask)
    torch.testing.assert_close(logits_ours, logits_theirs, **OUT_TOL)
    loss_ours.backward()
    loss_theirs.backward()
    worst = assert_same_adapter_grads(ours, theirs)
    assert all(v < 1e-4 for v in worst.values()), worst
    if kind == "8bit":
        return  # PEFT's own 8-bit layer fails in eval after a training step on CPU (bitsandbytes 0.50 loses SCB)
    # eval mode (bitsandbytes takes its inference kernels): still equal
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, **OUT_TOL)
    # the only trainable parameters are the adapters, as with PEFT
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) for n in trainable)


# unit roundoff of the half-precision formats (a T4 computes in float16, an A100 in bfloat16)
HALF_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _fp32_copy(model):
    """The same model (same quantised weights, same adapter) computing in float32: the reference."""
    import bitsandbytes as bnb

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    for t in [*ref.parameters(), *ref.buffers()]:
        if t.is_floating_point() and type(t).__name__ != "Params4bit":
            t.data = t.data.float()
    return ref


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm()).item()


def _adapter_grads(model, ids, mask):
    model.train()
    logits, loss = loss_of(model, ids, mask)
    loss.backward()
    grads = {"A": [], "B": [], "m": []}
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            key = "A" if "lora_A" in name else "B" if "lora_B" in name else "m"
            grads[key].append(p.grad.detach().float().flatten())
    return logits.detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_half_precision_matches_peft(tiny_dir, kind, dtype):
    """A bf16/fp16 base (4-bit: that compute dtype) against PEFT, with errors measured in the dtype's eps.

    Both implementations round differently, so they agree to a few eps, not to fp32 precision; on
    the same weights computed in fp32, trkit's error must be no larger than PEFT's (within 1.5x).
    Measured (2-layer tiny Qwen3): logits differ by 0.7-1.5 eps, all gradients of a kind by 0.6-2 eps,
    the worst single gradient tensor by 1.4-5.3 eps.
    """
    eps = HALF_EPS[dtype]
    ours, theirs = make_pair(tiny_dir, kind, dtype=dtype, seed=7)
    reference = _fp32_copy(ours)
    ids, mask = batch()
    logits_ours, grads_ours = _adapter_grads(ours, ids, mask)
    logits_theirs, grads_theirs = _adapter_grads(theirs, ids, mask)
    logits_ref, grads_ref = _adapter_grads(reference, ids, mask)
    assert logits_ours.dtype == logits_theirs.dtype == dtype
    assert logits_ref.dtype == torch.float32
    assert _rel(logits_ours, logits_theirs) < 3 * eps
    assert _rel(logits_ours, logits_ref) < 1.5 * _rel(logits_theirs, logits_ref)
    for key in ("A", "B", "m"):
        assert len(grads_ours[key]) == len(grads_theirs[key]) == 2 * len(TARGETS)
        assert max(_rel(a, b) for a, b in zip(grads_ours[key], grads_theirs[key])) < 10 * eps, key
        ours_all, theirs_all, ref_all = (torch.cat(g[key]) for g in (grads_ours, grads_theirs, grads_ref))
        assert _rel(ours_all, theirs_all) < 4 * eps, key
        assert _rel(ours_all, ref_all) < 1.5 * _rel(theirs_all, ref_all), key


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_dropout_follows_peft_semantics(tiny_dir, kind):
    ours, theirs = make_pair(tiny_dir, kind, dropout=0.3)
    ours.train(), theirs.train()
    ids, mask = batch(1)
    torch.manual_seed(123)
    logits_ours, loss_ours = loss_of(ours, ids, mask)
    torch.manual_seed(123)
    logits_theirs, loss_theirs = loss_of(theirs, ids, mask)
    torch.testing.assert_close(logits_ours, logits_theirs, **OUT_TOL)
    loss_ours.backward()
    loss_theirs.backward()
    assert_same_adapter_grads(ours, theirs)
    # in eval mode dropout is off: the output no longer depends on the seed
    ours.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = ours(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(2)
        b = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_fresh_adapter_is_the_identity(tiny_dir):
    base = load_base(tiny_dir, "linear").eval()
    wrapped = dora.apply_dora(copy.deepcopy(base), TARGETS, r=8, alpha=16).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the norm, without out×in matrices
def _dense_norm(layer: dora.DoRALinear, w0: torch.Tensor) -> torch.Tensor:
    delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    return torch.linalg.norm(w0.float() + delta, dim=1)


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_norm_expansion_equals_dense_norm(tiny_dir, kind):
    from peft.utils.integrations import dequantize_module_weight

    ours, _ = make_pair(tiny_dir, kind)
    for name, layer in dora.dora_layers(ours).items():
        w0 = dequantize_module_weight(layer.base_layer).float()
        torch.testing.assert_close(layer.weight_row_norm_sq, w0.pow(2).sum(1), rtol=1e-6, atol=1e-6)
        expected = _dense_norm(layer, w0).detach()
        torch.testing.assert_close(layer.weight_norm(), expected, rtol=1e-6, atol=1e-6)
        # the forward path: W0·Aᵀ from the base layer's own kernel
        with torch.no_grad():
            w0_at = layer.base_layer(layer.lora_A.weight)
            if layer.base_layer.bias is not None:
                w0_at = w0_at - layer.base_layer.bias
        torch.testing.assert_close(layer._norm_from_w0_at(w0_at), expected, rtol=1e-5, atol=1e-6)


def test_chunked_dequantisation_4bit_and_8bit():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant

    torch.manual_seed(0)
    # 128 inputs: whole quantisation blocks per row, so row chunks are used; 96: one piece
    for in_f, n_chunks in ((128, 10), (96, 1)):
        dense = nn.Linear(in_f, 50)
        for nested in (True, False):
            q4 = bnb.nn.Linear4bit(in_f, 50, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
            q4.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=nested)
            q4 = q4.to("cpu")
            full = dequantize_4bit(q4.weight.data, q4.weight.quant_state)
            chunks = list(dora._iter_dense_row_chunks(q4, chunk_elements=in_f * 5))
            assert len(chunks) == n_chunks
            torch.testing.assert_close(torch.cat([w for _, _, w in chunks]), full, rtol=0, atol=0)
            torch.testing.assert_close(dora.weight_row_norm_sq(q4), full.pow(2).sum(1))
    dense = nn.Linear(96, 50)
    q8 = bnb.nn.Linear8bitLt(96, 50, has_fp16_weights=False)
    q8.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q8 = q8.to("cpu")
    full8 = int8_vectorwise_dequant(q8.weight.data, q8.weight.SCB)
    torch.testing.assert_close(dora.weight_row_norm_sq(q8), full8.float().pow(2).sum(1))


def test_8bit_base_matches_dense_reference():
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_dequant

    torch.manual_seed(0)
    q8 = bnb.nn.Linear8bitLt(48, 40, bias=True, has_fp16_weights=False)
    q8.weight = bnb.nn.Int8Params(torch.randn(40, 48) * 0.1, requires_grad=False, has_fp16_weights=False)
    q8 = q8.to("cpu")
    box = nn.Sequential()
    box.add_module("proj", q8)
    dora.apply_dora(box, ["proj"], r=4, alpha=8)
    layer = box.proj
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    w0 = int8_vectorwise_dequant(q8.weight.data, q8.weight.SCB).float()
    box.train()
    x = torch.randn(5, 48)
    n = _dense_norm(layer, w0).detach()
    expected = (layer.lora_magnitude_vector / n) * (x @ (w0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).T) + q8.bias
    torch.testing.assert_close(box(x), expected, rtol=1e-4, atol=1e-5)
    # eval: int8 activations in the base GEMM, but n still comes from the exact int8 weight
    box.eval()
    with torch.no_grad():
        box(x)
    torch.testing.assert_close(layer._norm_cache["n"], n, rtol=1e-6, atol=1e-6)


def test_no_out_by_in_tensor_is_allocated():
    """Record every new storage created in forward+backward: trkit's stay far below out×in, PEFT's do not."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
            return out

    in_f, out_f, tokens = 256, 384, 8

    def largest(method):
        torch.manual_seed(0)
        box = nn.Sequential()
        box.add_module("proj", nn.Linear(in_f, out_f, bias=True))
        if method == "trkit":
            model = dora.apply_dora(box, ["proj"], r=4, alpha=8)
        else:
            model = get_peft_model(box, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
        x = torch.randn(tokens, in_f, requires_grad=True)
        with LargestAllocation() as mode:
            model(x).sum().backward()
        return mode.largest

    assert largest("peft") >= out_f * in_f  # PEFT materialises W0 + s·B·A: the probe can see it
    assert largest("trkit") <= (tokens + 4) * max(in_f, out_f)  # nothing bigger than (tokens + r) rows


# --------------------------------------------------------------------------- files: both ways
def test_trkit_adapter_loads_in_peft(tiny_dir, tmp_path):
    from peft import PeftModel
    from trkit.artifacts import read_manifest

    ours, _ = make_pair(tiny_dir, "linear", seed=3)
    dora.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA" and cfg["r"] == 4
    manifest = read_manifest(tmp_path / "adapter")
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(FileExistsError):
        dora.save_adapter(ours, tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(load_base(tiny_dir, "linear"), tmp_path / "adapter").eval()
    ours.eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, **OUT_TOL)


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_peft_adapter_loads_in_trkit(tiny_dir, tmp_path, kind):
    _, theirs = make_pair(tiny_dir, kind, seed=4)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = dora.load_adapter(load_base(tiny_dir, kind), tmp_path / "peft_adapter")
    assert len(dora.dora_layers(ours)) == 2 * len(TARGETS)
    ours.eval(), theirs.eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, **OUT_TOL)
    # and back out: the re-saved tensors are PEFT's, key for key
    from safetensors.torch import load_file

    dora.save_adapter(ours, tmp_path / "resaved")
    a = load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_adapter_rejects_bad_input(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(load_base(tiny_dir, "linear"), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "plain_lora")
    with pytest.raises(ValueError, match="DoRA adapters only"):
        dora.load_adapter(load_base(tiny_dir, "linear"), tmp_path / "plain_lora")

    ours, _ = make_pair(tiny_dir, "linear")
    dora.save_adapter(ours, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated write
    with pytest.raises(ValueError, match="sha256"):
        dora.load_adapter(load_base(tiny_dir, "linear"), tmp_path / "a")

    wrong_rank = dora.apply_dora(load_base(tiny_dir, "linear"), TARGETS, r=8, alpha=8)
    dora.save_adapter(ours, tmp_path / "b")
    with pytest.raises(ValueError, match="r=8"):
        dora.load_adapter(wrong_rank, tmp_path / "b")
    with pytest.raises(ValueError, match="no module matches"):
        dora.apply_dora(load_base(tiny_dir, "linear"), ["qkv"], r=4, alpha=8)
    with pytest.raises(ValueError, match="already has DoRA"):
        dora.apply_dora(ours, TARGETS, r=4, alpha=8)


# --------------------------------------------------------------------------- merge
def test_merge_matches_peft_and_unmerge_restores(tiny_dir):
    ours, theirs = make_pair(tiny_dir, "linear", seed=5)
    ours.eval(), theirs.eval()
    original = {n: l.base_layer.weight.detach().clone() for n, l in dora.dora_layers(ours).items()}
    ids, mask = batch()
    with torch.no_grad():
        unmerged_out = ours(input_ids=ids, attention_mask=mask).logits
        dora.merge(ours)
        merged_out = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged_out, unmerged_out, **OUT_TOL)
    plain = theirs.merge_and_unload()
    for name, layer in dora.dora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, plain.get_submodule(name).weight, rtol=1e-6, atol=1e-6)
    dora.unmerge(ours)
    for name, layer in dora.dora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, original[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, unmerged_out, **OUT_TOL)
    exported = dora.merge_and_unload(ours)
    assert not dora.dora_layers(exported)
    assert all(type(m) is nn.Linear for n, m in exported.named_modules() if n.endswith(tuple(TARGETS)))


def test_merge_4bit_requantises_like_peft_and_unmerges_exactly(tiny_dir):
    from peft.utils.integrations import dequantize_module_weight

    ours, theirs = make_pair(tiny_dir, "4bit", seed=6)
    packed = {n: l.base_layer.weight.data.clone() for n, l in dora.dora_layers(ours).items()}
    dora.merge(ours)
    with pytest.warns(UserWarning):
        plain = theirs.merge_and_unload()
    for name, layer in dora.dora_layers(ours).items():
        a = dequantize_module_weight(layer.base_layer)
        b = dequantize_module_weight(plain.get_submodule(name))
        # the same fp32 merge, re-quantised: equal up to fp32 rounding of the (double-quantised) scales
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    dora.unmerge(ours)
    for name, layer in dora.dora_layers(ours).items():
        assert torch.equal(layer.base_layer.weight.data, packed[name])


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantised_merge_forward_unmerge_restores_the_layer(tiny_dir, kind):
    """merge -> forward -> unmerge -> forward gives the pre-merge output and leaves the weights intact.

    A Linear8bitLt moves its int8 weight and row scales into layer.state at its first forward; a
    forward while merged put the merged ones there, and the next forward after unmerge used them
    (and copied the merged int8 data into the original weight): 0.25 relative error on one layer.
    """
    ours = make_ours(tiny_dir, kind, seed=8)
    ours.eval()
    ids, mask = batch()
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits  # bitsandbytes fills layer.state here
        originals = {n: l.base_layer.weight.data.clone() for n, l in dora.dora_layers(ours).items()}
        dora.merge(ours)
        merged = ours(input_ids=ids, attention_mask=mask).logits
        dora.unmerge(ours)
        after = ours(input_ids=ids, attention_mask=mask).logits
        again = ours(input_ids=ids, attention_mask=mask).logits
    assert _rel(merged, before) < 0.2  # the merge re-quantises (lossy) but is the same function
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, before, rtol=1e-6, atol=1e-6)
    for name, layer in dora.dora_layers(ours).items():
        assert torch.equal(layer.base_layer.weight.data, originals[name]), name
    # and training after the round trip still matches a model that was never merged
    fresh = make_ours(tiny_dir, kind, seed=8)
    with torch.no_grad():
        for (_, a), (_, b) in zip(dora.dora_layers(fresh).items(), dora.dora_layers(ours).items()):
            a.lora_A.weight.copy_(b.lora_A.weight)
    ours.train(), fresh.train()
    torch.testing.assert_close(loss_of(ours, ids, mask)[1], loss_of(fresh, ids, mask)[1], rtol=1e-6, atol=1e-5)


def test_eval_norm_cache_sees_writes_through_data(tiny_dir):
    """``param.data`` writes do not bump the version counter; the cache must still notice them."""
    ours = make_ours(tiny_dir, "linear")
    layer = next(iter(dora.dora_layers(ours).values()))
    layer.eval()
    x = torch.randn(3, layer.in_features)
    for change in (lambda: layer.lora_B.weight.data.mul_(3), lambda: layer.lora_A.weight.data.add_(0.05)):
        with torch.no_grad():
            layer(x)  # caches n
            change()
            served = layer(x)
            layer._norm_cache = None
            recomputed = layer(x)
        torch.testing.assert_close(served, recomputed, rtol=1e-6, atol=1e-6)


def test_norm_cached_under_inference_mode_allows_backward(tiny_dir):
    """score_documents runs under inference_mode; an eval-mode forward+backward afterwards must work."""
    ours = make_ours(tiny_dir, "linear", seed=9)
    ours.eval()
    ids, mask = batch()
    with torch.inference_mode():
        scored = ours(input_ids=ids, attention_mask=mask).logits
    assert all(layer._norm_cache is not None for layer in dora.dora_layers(ours).values())
    logits, loss = loss_of(ours, ids, mask)  # eval mode, autograd on: the cached n is saved for backward
    loss.backward()
    torch.testing.assert_close(logits, scored, rtol=0, atol=0)
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad()
    for layer in dora.dora_layers(ours).values():
        layer._norm_cache = None
    loss_of(ours, ids, mask)[1].backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0, msg=n)


def test_eval_norm_cache_follows_adapter_changes(tiny_dir):
    ours, _ = make_pair(tiny_dir, "linear")
    layer = next(iter(dora.dora_layers(ours).values()))
    rows = []  # rows per base-layer call: x (3) and A (r) when n is computed, x alone when it is cached
    layer.base_layer.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    layer.eval()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        first = layer(x)
        again = layer(x)
        layer.lora_B.weight.mul_(2)  # an in-place update (as an optimizer step) invalidates the cache
        changed = layer(x)
        layer._norm_cache = None
        recomputed = layer(x)
    r = layer.r
    assert rows == [3, r, 3, 3, r, 3, r]
    torch.testing.assert_close(again, first, **OUT_TOL)
    torch.testing.assert_close(recomputed, changed, **OUT_TOL)
    assert not torch.allclose(changed, first, rtol=1e-3, atol=1e-3)
    layer.train()
    assert layer._norm_cache is None


@pytest.mark.slow
def test_benchmark_script_runs_and_trkit_needs_less_memory(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dora.py"
    spec = importlib.util.spec_from_file_location("bench_dora", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dora.json"
    assert bench.main(["--device", "cpu", "--shapes", "1024x1024", "--tokens", "64", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["shape"], r["base"]) for r in result["ratios"]} == {("1024x1024", "fp32"), ("1024x1024", "nf4")}
    for ratio in result["ratios"]:
        assert ratio["trkit_vs_peft_dora_output_rel_diff"] < 1e-5
        assert ratio["peak_vs_peft_dora"] < 0.6 and ratio["peak_rss_vs_peft_dora"] < 0.6
