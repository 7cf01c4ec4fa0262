"""trkit.neftune: per-sample scale from the attention mask, zero noise on pads, training mode only."""

from __future__ import annotations

import copy

import pytest
import torch

from trkit.neftune import activate_neftune, neftune

D = 64  # hidden size of the tiny model


def tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=D, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    return Qwen3ForCausalLM(config)


@pytest.fixture
def model():
    return tiny_model()


def padded_batch(lengths, total, left=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), total), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if left:
            mask[i, total - n:] = 1
        else:
            mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def embedded(model, call):
    """The input embeddings as the decoder saw them (after any noise hook), for one forward ``call``."""
    seen = []
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        call()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def clean_embeddings(model, ids):
    return model.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("left", [False, True])
def test_pads_get_no_noise_and_each_sample_its_own_scale(model, left):
    alpha = 5.0
    lengths = [40, 25, 10]
    ids, mask = padded_batch(lengths, 40, left=left)
    model.train()
    with neftune(model, alpha):
        noised = embedded(model, lambda: model(input_ids=ids, attention_mask=mask))
    noise = noised - clean_embeddings(model, ids)
    assert torch.equal(noise[mask == 0], torch.zeros_like(noise[mask == 0]))  # pads: exactly untouched
    for i, n in enumerate(lengths):
        bound = alpha / (n * D) ** 0.5
        values = noise[i][mask[i] == 1]  # (n, D): n·D samples of Uniform(−bound, bound)
        count = values.numel()
        assert values.abs().max() <= bound * (1 + 1e-6)
        assert values.abs().max() >= 0.95 * bound  # P(all |u| < 0.95) = 0.95**(n·D) < 1e-14
        # E|u| = bound/2 with standard deviation bound/√12 per sample: 5 standard errors
        assert abs(values.abs().mean().item() - bound / 2) < 5 * bound / (12 * count) ** 0.5
        assert abs(values.mean().item()) < 5 * bound / (3 * count) ** 0.5  # E u = 0, sd bound/√3
        # transformers' scale would be α/√(40·D) for every row: short rows get their own, larger noise
        if n < 40:
            assert values.abs().max() > alpha / (40 * D) ** 0.5


def test_no_noise_in_eval_mode(model):
    ids, mask = padded_batch([12, 7], 12)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with neftune(model, 10.0):
            seen = embedded(model, lambda: model(input_ids=ids, attention_mask=mask))
            inside = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(seen, clean_embeddings(model, ids))
    assert torch.equal(inside, reference)


@pytest.mark.parametrize("mask_kind", ["ones", "none"])
def test_equals_transformers_hook_without_padding(model, mask_kind):
    from transformers.integrations.neftune import activate_neftune as hf_activate
    from transformers.integrations.neftune import deactivate_neftune as hf_deactivate

    ids, _ = padded_batch([16, 16, 16], 16)
    kwargs = {"input_ids": ids}
    if mask_kind == "ones":
        kwargs["attention_mask"] = torch.ones_like(ids)
    model.train()
    with neftune(model, 5.0):
        torch.manual_seed(1234)
        ours = embedded(model, lambda: model(**kwargs))
    hf_handle = hf_activate(model, 5.0)
    try:
        torch.manual_seed(1234)
        theirs = embedded(model, lambda: model(**kwargs))
    finally:
        hf_deactivate(model, hf_handle)
    assert not torch.equal(ours, clean_embeddings(model, ids))
    torch.testing.assert_close(ours, theirs)  # same random numbers; scale applied in another order (1 ulp)


def test_differs_from_transformers_hook_with_padding(model):
    from transformers.integrations.neftune import activate_neftune as hf_activate
    from transformers.integrations.neftune import deactivate_neftune as hf_deactivate

    ids, mask = padded_batch([16, 4], 16)
    model.train()
    hf_handle = hf_activate(model, 5.0)
    try:
        theirs = embedded(model, lambda: model(input_ids=ids, attention_mask=mask)) - clean_embeddings(model, ids)
    finally:
        hf_deactivate(model, hf_handle)
    assert theirs[mask == 0].abs().max() > 0  # transformers noises the pads; ours does not (test above)


def test_removal_restores_outputs_exactly(model):
    ids, mask = padded_batch([9, 5], 9)
    model.train()  # dropout is 0 in this config: outputs are deterministic without noise
    before = model(input_ids=ids, attention_mask=mask).logits.detach()
    handle = activate_neftune(model, 5.0)
    during = model(input_ids=ids, attention_mask=mask).logits.detach()
    handle.remove()
    after = model(input_ids=ids, attention_mask=mask).logits.detach()
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    with neftune(model, 5.0):
        assert not torch.allclose(before, model(input_ids=ids, attention_mask=mask).logits.detach())
    assert torch.equal(before, model(input_ids=ids, attention_mask=mask).logits.detach())
    assert not hasattr(model, "_trkit_neftune")


def test_positional_mask_and_bad_input(model):
    ids, mask = padded_batch([8, 3], 8)
    model.train()
    with neftune(model, 5.0):
        noise = embedded(model, lambda: model(ids, mask)) - clean_embeddings(model, ids)  # mask passed positionally
        assert torch.equal(noise[mask == 0], torch.zeros_like(noise[mask == 0]))
        with pytest.raises(ValueError, match="already active"):
            activate_neftune(model, 5.0)
        with pytest.raises(ValueError, match="2-D attention_mask"):
            model(input_ids=ids, attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match="positive"):
        activate_neftune(model, 0.0)


def _save_tiny(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("wrapper", ["peft_lora", "peft_trainable_tokens", "4bit", "trkit_dora"])
def test_works_on_wrapped_models(tmp_path, wrapper):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_model()
    if wrapper == "4bit":
        import bitsandbytes as bnb

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(_save_tiny(tmp_path), quantization_config=quant, device_map="cpu", dtype=torch.float32)
        for m in base.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    clean_weight = base.get_input_embeddings().weight.detach().clone()
    if wrapper == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    elif wrapper == "peft_trainable_tokens":
        from peft import LoraConfig, get_peft_model

        # stage 2: LoRA plus trained rows for new tokens (PEFT wraps the embedding module)
        config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [120, 121]})
        model = get_peft_model(base, config)
    elif wrapper == "trkit_dora":
        from trkit.dora import apply_dora

        model = apply_dora(base, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    else:
        model = base
    ids, mask = padded_batch([10, 4], 10)
    ids[0, 3] = 120  # a "new" token row
    model.train()
    with neftune(model, 5.0):
        noised = embedded(model, lambda: model(input_ids=ids, attention_mask=mask))
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()  # training through the hooks works
    noise = noised - clean_weight[ids]
    assert torch.equal(noise[mask == 0], torch.zeros_like(noise[mask == 0]))
    for i, n in enumerate([10, 4]):
        bound = 5.0 / (n * D) ** 0.5
        values = noise[i][mask[i] == 1]
        assert values.abs().max() <= bound * (1 + 1e-6) and values.abs().max() > 0.9 * bound


def test_trainer_callback_active_only_while_training(tmp_path, model):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trkit.neftune import NEFTuneCallback

    ids, mask = padded_batch([12, 6, 9, 12], 12)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()})
    records = []  # (training mode, max |noise| on real tokens, max |noise| on pads) per forward

    def probe(module, args, output):
        batch_ids = probe.ids
        noise = (output - clean_embeddings(model, batch_ids)).abs()
        m = probe.mask.bool()
        records.append((module.training, noise[m].max().item(), noise[~m].max().item() if (~m).any() else 0.0))

    class Recorder(TrainerCallback):  # after NEFTuneCallback in the list: registers the probe after its hook
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.handle = model.get_input_embeddings().register_forward_hook(probe)

        def on_train_end(self, args, state, control, **kwargs):
            self.handle.remove()

    pre = model.register_forward_pre_hook(
        lambda mod, args, kwargs: setattr(probe, "ids", kwargs["input_ids"]) or setattr(probe, "mask", kwargs["attention_mask"]),
        with_kwargs=True,
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                             eval_strategy="steps", eval_steps=1, logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                      callbacks=[NEFTuneCallback(5.0), Recorder()])
    trainer.train()
    pre.remove()
    train_records = [r for r in records if r[0]]
    eval_records = [r for r in records if not r[0]]
    assert len(train_records) == 2 and eval_records  # two training steps, evaluation in between
    assert all(real > 0 and pad == 0 for _, real, pad in train_records)
    assert all(real == 0 and pad == 0 for _, real, pad in eval_records)
    assert not hasattr(model, "_trkit_neftune")  # removed at train end
    model.train()
    after = embedded(model, lambda: model(input_ids=ids, attention_mask=mask))
    assert torch.equal(after, clean_embeddings(model, ids))
