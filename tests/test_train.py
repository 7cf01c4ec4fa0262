"""The training stage: chunked loss = full loss, packing, PEFT-loadable adapters, exact resume after SIGKILL,
DDP = accumulation, merge, refusals before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trkit import embeddings, losses, packing, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ext_model(qwen_ext, tiny_qwen3_dir, tmp_path_factory):
    """The tiny Qwen3 extended with the 64-token Qwen3 extension (what `trkit embed` writes)."""
    out = tmp_path_factory.mktemp("extmodel") / "model"
    embeddings.extend_checkpoint(tiny_qwen3_dir, qwen_ext, out, init="fvt", output_init="first", progress=False)
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from trkit import assets

    path = tmp_path_factory.mktemp("corpus") / "tr.txt"
    lines = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:400]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small(ext_model, corpus_file, out, **kw) -> train.TrainConfig:
    base = dict(model=str(ext_model), out=str(out), corpus=[str(corpus_file)], max_steps=4, seq_len=32, batch_size=2,
                eval_chars=0, profile="cpu", dtype="float32", progress=False, save_steps=2)
    base.update(kw)
    return train.TrainConfig(**base)


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_peft_helpers(qwen_ext, tied_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trkit import assets

    untied = embeddings.extend_model(assets.tiny_qwen3(), qwen_ext, init="fvt", output_init="first")
    idx = train.trainable_token_indices(untied, qwen_ext)
    assert idx == {"embed_tokens": qwen_ext.new_ids, "lm_head": qwen_ext.new_ids}
    tied = embeddings.extend_model(AutoModelForCausalLM.from_pretrained(tied_dir), qwen_ext, init="fvt", output_init="fvt")
    assert train.trainable_token_indices(tied, qwen_ext) == {"embed_tokens": qwen_ext.new_ids}
    peft_model = get_peft_model(untied, train.new_rows_peft_config(untied, qwen_ext))
    groups = train.new_rows_param_groups(peft_model, lr=1e-3, embedding_lr_ratio=0.25)
    assert groups[0]["lr"] == pytest.approx(2.5e-4) and len(groups) == 1
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == 2 * len(qwen_ext.new_ids) * 64  # input and output rows, nothing else
    lora = get_peft_model(embeddings.extend_model(assets.tiny_qwen3(), qwen_ext, output_init="first"),
                          train.new_rows_peft_config(untied, qwen_ext, r=4, target_modules=["q_proj"]))
    groups = train.new_rows_param_groups(lora, lr=1e-3)
    assert [g["name"] for g in groups] == ["new_token_rows", "adapters"] and groups[0]["lr"] == pytest.approx(2e-4)





@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_loss_and_gradients(tied, tied_dir):
    """The chunked head loss gives the model's own loss and the same gradients (rows included)."""
    from peft import TrainableTokensConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trkit import assets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tied_dir) if tied else assets.tiny_qwen3()
    ids = list(range(151669, 151690))
    targets = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    pm = get_peft_model(model, TrainableTokensConfig(target_modules=targets, token_indices=ids))
    for p in pm.parameters():
        if p.requires_grad:
            p.data.normal_()
    x = torch.randint(0, 151690, (3, 33))
    labels = x.clone()
    labels[0, :7] = -100
    causal = pm.get_base_model()
    full, n = losses.full_cross_entropy(causal(input_ids=x).logits, labels)
    full.backward()
    want = {k: p.grad.clone() for k, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    hidden = causal.get_decoder()(input_ids=x).last_hidden_state
    chunked, n2 = losses.chunked_cross_entropy(hidden, losses.head_parts(causal), labels, chunk_size=10)
    chunked.backward()
    assert n == n2 == 3 * 32 - 6
    assert abs(float(chunked) - float(full)) / float(full) < 1e-6
    for k, p in pm.named_parameters():
        if p.requires_grad:  # fp32 sums in another order: within 1e-6 of the largest gradient entry
            assert torch.allclose(p.grad, want[k], rtol=1e-4, atol=1e-6 * float(want[k].abs().max()) + 1e-12), k


def test_pack_text_records_exact_byte_offsets(qwen_ext):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_ext.directory)
    docs = packing.Documents(texts=["Ağaç dalında kuş öttü.", "İstanbul'da yağmur var; çiçekler açtı.", "ğğğ şşş"],
                             source="test", sha256="x")
    packed = packing.pack_text(tok, docs, seq_len=8)
    assert packed.stats["misaligned_documents"] == 0 and packed.stats["separator_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    flat_ids = packed.input_ids.reshape(-1)
    flat_doc, flat_end = packed.doc.reshape(-1), packed.end_byte.reshape(-1)
    lengths = packing.token_byte_lengths(tok)
    for d, text in enumerate(docs.texts):
        sel = (flat_doc == d)
        ends = flat_end[sel][1:]  # the separator ends at byte 0
        if len(ends):
            data = text.encode("utf-8")
            assert (ends[1:] - ends[:-1] == lengths[flat_ids[sel][2:]]).all()
            assert ends.max() <= len(data)
    with pytest.raises(ValueError, match="zero blocks"):
        packing.pack_text(tok, packing.Documents(["kısa"], "t", "x"), seq_len=512)


def test_pack_chat_labels_only_assistant_turns(qwen3_tokenizer):
    convs = [[{"role": "user", "content": "Merhaba, nasılsın?"}, {"role": "assistant", "content": "İyiyim, teşekkürler."}],
             [{"role": "user", "content": "Başkent neresi?"}, {"role": "assistant", "content": "Ankara."},
              {"role": "user", "content": "Ya İstanbul?"}, {"role": "assistant", "content": "En büyük şehir."}]]
    packed = packing.pack_chat(qwen3_tokenizer, packing.Documents(convs, "t", "x", kind="chat"), seq_len=128)
    assert len(packed) == 1  # both conversations fit one block, neither is split
    labelled = [int(t) for t, lab in zip(packed.input_ids[0], packed.labels[0]) if lab != -100]
    text = qwen3_tokenizer.decode(labelled)
    for answer in ("İyiyim, teşekkürler.", "Ankara.", "En büyük şehir."):
        assert answer in text
    for question in ("Merhaba", "Başkent", "Ya İstanbul"):
        assert question not in text
    assert packing.conversation({"instruction": "Çevir", "input": "cat", "output": "kedi"})[1]["content"] == "kedi"


@pytest.mark.parametrize("adapter,stage", [("dora", "adapters"), ("lora", "adapters"), ("none", "rows")])
def test_adapter_loads_with_peft_and_gives_the_trained_model(ext_model, corpus_file, tmp_path, adapter, stage):
    """OUT/adapter loads with PeftModel.from_pretrained(extended model, dir), new rows included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small(ext_model, corpus_file, tmp_path / "run", stage=stage, adapter=adapter, lr=5e-2, embedding_lr=5e-2)
    result = train.train(cfg)
    trained = _adapter(result.adapter)
    assert any("trainable_tokens_delta" in k for k in trained)
    base = AutoModelForCausalLM.from_pretrained(ext_model)
    x = torch.tensor([[151643, 151669, 151670, 151671, 1000, 2000]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(base, str(result.adapter)).eval()
        after = peft_model(input_ids=x).logits
    assert not torch.allclose(before, after, atol=1e-4)  # training changed the model...
    rebuilt = train.build_model(cfg.resolved(__import__("trkit.profiles", fromlist=["x"]).get_profile("cpu")),
                                __import__("trkit.profiles", fromlist=["x"]).get_profile("cpu"))
    train.load_adapter_files(rebuilt, result.adapter)
    rebuilt.model.eval()
    with torch.no_grad():
        mine = rebuilt.model(input_ids=x).logits
    assert torch.allclose(after, mine, atol=2e-4, rtol=1e-4)  # ...and PEFT's reading of the file is trkit's model
    card = (tmp_path / "run" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and f"| stage | {stage} |" in card
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_chunked_and_full_loss_train_the_same_parameters(ext_model, corpus_file, tmp_path):
    a = train.train(small(ext_model, corpus_file, tmp_path / "chunked", loss="chunked", loss_chunk=7, max_steps=2))
    b = train.train(small(ext_model, corpus_file, tmp_path / "full", loss="full", max_steps=2))
    ta, tb = _adapter(a.adapter), _adapter(b.adapter)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-5, rtol=1e-4), k
    la = [r["loss"] for r in a.log if "loss" in r]
    lb = [r["loss"] for r in b.log if "loss" in r]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def _row_labels(cfg: train.TrainConfig, steps: int, span) -> set[int]:
    """The new-token ids that are labels in the first ``steps`` optimizer steps of ``cfg``'s data."""
    from trkit import loading

    tok = loading.load_tokenizer(cfg.model)
    packed = packing.pack(tok, packing.document_stream(cfg.corpus, seed=cfg.seed), cfg.seq_len)
    seen = set()
    for m in range(steps):  # grad_accum 1, one process
        labels = packed.batch(train._micro_blocks(m, cfg.batch_size, len(packed), cfg.seed))["labels"]
        seen.update(int(i) for i in labels.flatten() if span[0] <= int(i) < span[1])
    return seen


def test_rows_absent_from_a_step_do_not_take_adam_sized_steps(ext_model, corpus_file, tmp_path):
    """With eps = 1e-8, Adam turns the tiny softmax push-down of an output row whose token is in no label into a
    full lr-sized step; the rows' eps (half the gradient of one occurrence) keeps those rows almost still while
    rows that are labels still move by ~lr per step."""
    lr, steps = 1e-2, 4
    span = train.new_token_range(ext_model)
    rows = torch.arange(span[0], span[1])
    runs = {}
    for name, eps in (("auto", None), ("adam", 1e-8)):
        cfg = small(ext_model, corpus_file, tmp_path / name, stage="rows", adapter="none", embedding_lr=lr,
                    embedding_eps=eps, max_steps=steps, warmup_steps=0, max_grad_norm=0.0)
        run = train.train(cfg)
        delta = next(v for k, v in _adapter(run.adapter).items() if "lm_head" in k and train.TOKEN_DELTA in k)
        groups = json.loads((Path(cfg.out) / train.CONFIG_NAME).read_text())["optimizer_groups"]
        runs[name] = (delta, groups[0]["eps"])
    from safetensors import safe_open

    with safe_open(str(Path(ext_model) / "model.safetensors"), "pt") as f:
        start = f.get_tensor("lm_head.weight")[rows].float()
    seen = _row_labels(cfg, steps, span)
    absent = torch.tensor([i not in seen for i in rows.tolist()])
    assert 0 < int(absent.sum()) < len(rows), "the test needs rows that are labels and rows that are not"
    moved = {k: (d.float() - start).abs().amax(1) for k, (d, _) in runs.items()}
    eps_auto = runs["auto"][1]
    assert runs["adam"][1] == 1e-8 and 1e-6 < eps_auto < 1.0
    # plain Adam: absent rows move like the rows that are labels (the bug); with the rows' eps they barely move
    assert moved["adam"][absent].median() > 0.5 * lr * steps
    assert moved["auto"][absent].median() < 0.01 * moved["adam"][absent].median()
    assert moved["auto"][~absent].min() > 100 * moved["auto"][absent].median()  # rows that are labels still learn


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "trkit", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_is_bitwise_identical(ext_model, corpus_file, tmp_path):
    """A real process killed with SIGKILL after a checkpoint, then resumed, ends with the same parameters as an
    uninterrupted run: optimizer (SophiaG's h), schedule, data position and the RNG of dropout, NEFTune and the
    GNB labels all restored."""
    args = ["--model", str(ext_model), "--corpus", str(corpus_file), "--max-steps", "6", "--seq-len", "32",
            "--batch-size", "2", "--save-steps", "2", "--eval-chars", "0", "--profile", "cpu", "--dtype", "float32",
            "--quiet", "--dropout", "0.1", "--neftune-alpha", "5", "--optimizer", "sophia", "--hessian-every", "2",
            "--adapter", "dora", "--grad-accum", "2"]
    ref = _cli([*args, "--out", str(tmp_path / "a")])
    killed = _cli([*args, "--out", str(tmp_path / "b")])
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoint-4").is_dir():
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read() if killed.poll() else "timeout"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "adapter").exists()
    assert ref.wait() == 0, ref.stderr.read()
    resumed = _cli([*args, "--out", str(tmp_path / "b")])
    assert resumed.wait() == 0, resumed.stderr.read()
    a, b = _adapter(tmp_path / "a" / "adapter"), _adapter(tmp_path / "b" / "adapter")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la if "loss" in r] == [r["loss"] for r in lb if "loss" in r]
    # the run is complete: a rerun (a Colab user pressing "run all" again) does nothing
    again = _cli([*args, "--out", str(tmp_path / "b")])
    assert again.wait() == 0 and "nothing to do" in again.stderr.read()


def test_two_processes_equal_one_with_accumulation(ext_model, corpus_file, tmp_path):
    """accelerate launch with 2 CPU processes (gloo), micro-batch b = 1 process, micro-batch b, 2 accumulation steps."""
    common = ["-m", "trkit", "train", "--model", str(ext_model), "--corpus", str(corpus_file), "--max-steps", "3",
              "--seq-len", "32", "--batch-size", "2", "--save-steps", "0", "--save-minutes", "0", "--eval-chars", "0",
              "--profile", "cpu", "--dtype", "float32", "--quiet", "--adapter", "lora"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--grad-accum", "2", "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # the shipped multi-GPU config (distributed_type MULTI_GPU = accelerate's torchrun launcher); on a machine without
    # GPUs its processes use gloo on the CPU
    config = ROOT / "trkit" / "data" / "accelerate_multi_gpu.yaml"
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                          "--num_processes", "2", "--dynamo_backend", "no", *common,
                          "--grad-accum", "1", "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    l2 = [json.loads(x)["loss"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(l1) == len(l2) == 3 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    a, b = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_sharded_launch_modes_are_refused_before_loading():
    for kind in ("DistributedType.FSDP", "DEEPSPEED", "DistributedType.MULTI_GPU", "MULTI_CPU", "NO"):
        if "FSDP" in kind or "DEEPSPEED" in kind:
            with pytest.raises(ValueError, match="data-parallel only"):
                train.check_distributed_type(kind)
        else:
            train.check_distributed_type(kind)


def test_merge_writes_a_plain_checkpoint_equal_to_the_adapter(ext_model, corpus_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small(ext_model, corpus_file, tmp_path / "run", adapter="dora", lr=5e-2, embedding_lr=5e-2, merge=True,
                max_steps=2)
    result = train.train(cfg)
    merged = AutoModelForCausalLM.from_pretrained(result.merged).eval()
    base = AutoModelForCausalLM.from_pretrained(ext_model)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter)).eval()
    x = torch.tensor([[151643, 151669, 151700, 1000, 2000, 151670]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, peft_model(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_refusals_before_any_training(ext_model, corpus_file, tmp_path, tiny_qwen3_dir):
    with pytest.raises(ValueError, match="has none"):
        train.train(small(tiny_qwen3_dir, corpus_file, tmp_path / "a", stage="rows"))
    short = tmp_path / "short.txt"
    short.write_text("kısa bir cümle\n", encoding="utf-8")
    with pytest.raises(ValueError, match="zero blocks"):
        train.train(small(ext_model, short, tmp_path / "b", seq_len=4096))
    with pytest.raises(ValueError, match="destroy that input"):
        train.train(small(ext_model, corpus_file, ext_model))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a trkit train directory"):
        train.train(small(ext_model, corpus_file, mine))
    with pytest.raises(ValueError, match="--stage adapters with --adapter none"):
        train.train(small(ext_model, corpus_file, tmp_path / "c", adapter="none"))
    # a checkpoint of another config is refused, naming what differs
    train.train(small(ext_model, corpus_file, tmp_path / "d", max_steps=2, save_steps=1, lr=1e-3))
    (tmp_path / "d" / "adapter").rename(tmp_path / "d" / "adapter-old")  # pretend the run is unfinished
    with pytest.raises(ValueError, match="lr"):
        train.train(small(ext_model, corpus_file, tmp_path / "d", max_steps=2, save_steps=1, lr=2e-3))
    from trkit.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a negative size while parsing
        main(["train", "--model", str(ext_model), "--out", str(tmp_path / "e"), "--batch-size", "-1"])
    assert exit_info.value.code == 2 and not (tmp_path / "e").exists()
