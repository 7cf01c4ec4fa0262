"""trkit.memory: exact parameter counts, the activation model against autograd, the breakdown, the monitor."""

from __future__ import annotations

import json
import time

import pytest
import torch

from trkit import memory
from trkit.memory import (
    BUILTIN_SHAPES,
    GIB,
    MemoryMonitor,
    count_parameters,
    estimate_training_memory,
    lora_parameters,
    model_shape,
    saved_activation_bytes_per_token,
)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def _config_of(shape):
    from transformers import LlamaConfig, Qwen3Config

    cls = Qwen3Config if shape.model_type == "qwen3" else LlamaConfig
    return cls(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
               num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
               num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
               tie_word_embeddings=shape.tie_word_embeddings)


def test_parameter_count_exact_for_tiny_qwen3():
    from trkit.assets import tiny_qwen3_config

    config = tiny_qwen3_config()
    assert count_parameters(model_shape(config.to_dict()))["total"] == _n_params(_meta_model(config))


def test_parameter_count_exact_for_smollm2_config(smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    expected = _n_params(_meta_model(config))
    assert count_parameters(model_shape(smollm2_dir))["total"] == expected  # read from the directory's config.json
    assert count_parameters(BUILTIN_SHAPES["HuggingFaceTB/SmolLM2-135M"])["total"] == expected
    assert expected == 134_515_008


@pytest.mark.parametrize("name", [n for n in BUILTIN_SHAPES if n.startswith("Qwen")])
def test_builtin_qwen3_table_matches_the_transformers_model(name):
    shape = BUILTIN_SHAPES[name]
    assert count_parameters(shape)["total"] == _n_params(_meta_model(_config_of(shape)))


def test_known_qwen3_sizes():
    assert count_parameters(model_shape("Qwen/Qwen3-8B"))["total"] == 8_190_735_360
    # the Qwen3-4B LoRA r=16 on all seven projections: 33,030,144 trainable parameters
    assert lora_parameters(model_shape("qwen3-4b"), 16)["lora"] == 33_030_144


@pytest.mark.parametrize("dora,tied", [(False, False), (True, True)])
def test_adapter_counts_match_peft(dora, tied):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    new_ids = list(range(250, 300))
    # untied: the new rows of both matrices are trained; tied: PEFT ties lm_head's rows to the embedding's
    token_targets = {"embed_tokens": new_ids} if tied else {"embed_tokens": new_ids, "lm_head": new_ids}
    torch.manual_seed(0)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora, target_modules=list(memory.ALL_TARGETS),
        trainable_token_indices=token_targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate_training_memory(config.to_dict(), weights="bf16", lora_rank=4, dora=dora, new_tokens=len(new_ids))
    assert est.parameters["trainable"] == trainable
    assert est.parameters["new_token_rows"] == len(new_ids) * 32 * (1 if tied else 2)
    assert (est.parameters["dora_magnitude"] > 0) == dora


def _saved_bytes(model, ids, autocast=True):
    """Bytes of the distinct non-parameter tensors autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_model_matches_autograd_saved_tensors(checkpointing):
    """Per decoder layer, the estimator's activation bytes equal what autograd keeps (HF Qwen3 + PEFT LoRA, bf16 autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    batch, seq = 2, 24

    def build(layers):
        config = Qwen3Config(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                             num_attention_heads=6, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = get_peft_model(Qwen3ForCausalLM(config).to(torch.bfloat16), LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(memory.ALL_TARGETS)))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model.train(), config

    ids = torch.randint(0, 500, (batch, seq), generator=torch.Generator().manual_seed(0))
    (one, config), (two, _) = build(1), build(2)
    per_layer = _saved_bytes(two, ids) - _saved_bytes(one, ids)
    shape = model_shape(config.to_dict())
    tokens = batch * seq
    if checkpointing:
        predicted = 2 * shape.hidden_size * tokens  # only the layer's input
    else:
        lora_layer = lora_parameters(shape, 8)["lora"] // shape.num_hidden_layers
        predicted = saved_activation_bytes_per_token(shape, 8) * tokens + 2 * lora_layer  # + autocast's adapter copies
    assert per_layer == pytest.approx(predicted, rel=0.02)


def test_logits_term_matches_the_measured_peak():
    """12 bytes per token per vocabulary entry: the peak of transformers' fp32 loss over half-precision logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokens, vocab = 512, 65536
    hidden = torch.randn(1, tokens, 32, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(vocab, 32, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    monitor = MemoryMonitor(interval=0.002)
    with monitor, monitor.phase("loss") as phase:
        logits = hidden @ head.T  # what lm_head returns
        loss = ForCausalLMLoss(logits, labels, vocab_size=vocab)
        del logits  # the Trainer drops the model outputs before backward
        loss.backward()
    measured = (phase.peak_rss - phase.rss_start) / (tokens * vocab)
    assert measured == pytest.approx(12, rel=0.15)


def test_breakdown_adds_up_and_moves_the_right_way():
    est = estimate_training_memory("Qwen/Qwen3-8B", weights="nf4", batch_size=1, seq_len=1024)
    assert est.total == sum(est.breakdown.values())
    assert set(est.breakdown) == {"weights", "adapters", "gradients", "optimizer_state", "activations", "logits",
                                  "workspace", "cuda_context", "allocator_reserve"}
    assert all(v >= 0 for v in est.breakdown.values())
    assert est.breakdown["logits"] == 12 * 1024 * 151936
    # the 4-bit base is the biggest part; logits next (the T4 trap)
    assert est.breakdown["weights"] > est.breakdown["logits"] > est.breakdown["activations"]
    formats = {w: estimate_training_memory("Qwen/Qwen3-8B", weights=w).breakdown["weights"] for w in ("nf4", "int8", "bf16")}
    assert formats["nf4"] < formats["int8"] < formats["bf16"] == pytest.approx(2 * 8_190_735_360, rel=1e-6)
    no_dq = estimate_training_memory("Qwen/Qwen3-8B", double_quant=False).breakdown["weights"]
    assert no_dq - est.breakdown["weights"] == pytest.approx(6_945_767_424 / 64 * (4 - 1 - 4 / 256), rel=1e-6)
    ckpt_off = estimate_training_memory("Qwen/Qwen3-8B", gradient_checkpointing=False)
    assert ckpt_off.breakdown["activations"] > 5 * est.breakdown["activations"]
    longer = estimate_training_memory("Qwen/Qwen3-8B", seq_len=2048)
    assert longer.breakdown["logits"] == 2 * est.breakdown["logits"]
    adam8 = estimate_training_memory("Qwen/Qwen3-8B", optimizer="adamw8bit").breakdown["optimizer_state"]
    assert adam8 < est.breakdown["optimizer_state"] / 3
    new_rows = estimate_training_memory("Qwen/Qwen3-8B", new_tokens=20000, vocab_size=151936 + 20000)
    assert new_rows.parameters["new_token_rows"] == 2 * 20000 * 4096  # untied: embedding and lm_head rows
    dora = estimate_training_memory("Qwen/Qwen3-8B", dora=True)
    assert dora.breakdown["activations"] > est.breakdown["activations"] and dora.breakdown["workspace"] > est.breakdown["workspace"]


def test_verdicts_and_largest_fitting_settings():
    est = estimate_training_memory("Qwen/Qwen3-8B", weights="nf4", batch_size=1, seq_len=1024)
    t4 = est.verdict("t4")
    assert t4["verdict"] == "fits" and t4["capacity_gib"] == 15.0
    best = t4["max_seq_len"]
    assert best % 128 == 0 and best >= 1024
    assert estimate_training_memory("Qwen/Qwen3-8B", seq_len=best).total <= 15 * GIB
    assert estimate_training_memory("Qwen/Qwen3-8B", seq_len=best + 128).total > 15 * GIB
    full_bf16 = estimate_training_memory("Qwen/Qwen3-8B", weights="bf16", batch_size=8, seq_len=2048)
    assert full_bf16.verdict("t4")["verdict"] == "OOM" and full_bf16.verdict("t4")["max_batch"] == 0
    with pytest.raises(ValueError, match="unknown GPU"):
        est.verdict("v100")


def test_bad_inputs_say_what_to_change(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_shape("no/such-model")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="not supported"):
        model_shape(tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        estimate_training_memory("Qwen/Qwen3-8B", optimizer="sgd")
    with pytest.raises(ValueError, match="nothing is trainable"):
        estimate_training_memory("Qwen/Qwen3-8B", lora_rank=0)
    with pytest.raises(ValueError, match="LoRA target"):
        estimate_training_memory("Qwen/Qwen3-8B", lora_targets=("qkv",))


def test_monitor_phases_record_peaks(tmp_path):
    monitor = MemoryMonitor(interval=0.01)
    with monitor:
        with monitor.phase("outer"):
            with monitor.phase("allocate 256 MiB"):
                block = torch.ones(64 * 2**20)  # 256 MiB of float32, touched
                time.sleep(0.05)
                del block
            with monitor.phase("idle"):
                time.sleep(0.03)
    phases = {p.name: p for p in monitor.phases}
    grown = phases["allocate 256 MiB"].peak_rss - phases["allocate 256 MiB"].rss_start
    assert grown > 200 * 2**20
    assert phases["outer"].peak_rss >= phases["allocate 256 MiB"].peak_rss  # the outer phase keeps the inner peak
    assert phases["idle"].peak_rss < phases["allocate 256 MiB"].peak_rss
    assert all(p.seconds > 0 for p in monitor.phases)
    rows = monitor.summary()
    assert [r["phase"] for r in rows] == ["outer", "allocate 256 MiB", "idle"]
    assert "| allocate 256 MiB |" in monitor.table()
    png = tmp_path / "timeline.png"
    monitor.plot(png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(monitor.save(tmp_path / "memory.json").read_text())
    assert saved["phases"][1]["phase"] == "allocate 256 MiB" and len(saved["samples"]) > 3


def test_memory_callback_logs_into_the_trainer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 40, (8,)), "labels": torch.randint(0, 40, (8,))} for _ in range(8)]
    monitor = MemoryMonitor(interval=0.05)
    callback = memory.MemoryCallback(monitor, every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    monitor.stop()
    logged = [h for h in trainer.state.log_history if "memory/rss_gib" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert all(h["memory/rss_gib"] > 0 for h in logged)
    assert [p.name for p in monitor.phases] == ["train"]


def test_cli_prints_breakdown_and_verdicts(capsys, tmp_path):
    from trkit.cli import main

    assert main(["memory", "--model", "Qwen/Qwen3-8B", "--profile", "t4", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| logits |" in out and "| t4 | 15 |" in out
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["settings"]["weights"] == "nf4" and report["settings"]["seq_len"] == 1024  # the t4 profile's
    assert report["total_bytes"] == sum(report["breakdown_bytes"].values())
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}))
    assert main(["memory", "--model", str(config.parent), "--profile", "a100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == count_parameters(model_shape(config))["total"]
    assert main(["memory", "--model", "nope/none", "--profile", "t4"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["memory", "--model", "Qwen/Qwen3-8B", "--profile", "cpu"]) == 2


def test_chunked_loss_estimate_counts_one_chunk_of_logits_and_no_merged_head():
    """trkit train's chunked loss: one chunk of fp32 logits + its half copy + the hidden-state gradient, and only the
    embedding's transient merged copy (the full-loss path keeps a merged lm_head and its dense gradient)."""
    from trkit.memory import estimate_for_profile

    kw = dict(lora_rank=16, dora=True, new_tokens=20_000, vocab_size=171_712, optimizer="adamw8bit")
    full = estimate_for_profile("Qwen/Qwen3-8B", "t4", **kw)
    chunked = estimate_for_profile("Qwen/Qwen3-8B", "t4", loss_chunk=512, **kw)
    tokens, v, h = 1024, 171_712, 4096
    assert chunked.breakdown["logits"] == 512 * v * 6 + 4 * tokens * h
    assert full.breakdown["logits"] == 12 * tokens * v
    assert full.breakdown["workspace"] - chunked.breakdown["workspace"] == 2 * v * h
    assert chunked.total < full.total
