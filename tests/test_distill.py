"""Distillation: compact lossless records, offsets rebuilt exactly, the exactness check (student = teacher + new
rows with -inf logits => KD 0 where the context holds no new token), the loss against a dense reference and its
gradients, training with --distill (rows / adapters, fp32 / bf16 / fp16, exact resume), refusals, ULD, and a
SIGKILLed cache that resumes byte-identical."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trkit import distill, embeddings, losses, packing, train

ROOT = Path(__file__).resolve().parent.parent
BASE = 151669  # len(Qwen3 tokenizer): the first new id


@pytest.fixture(scope="module")
def teacher_dir(tiny_qwen3_dir, tmp_path_factory):
    """The tiny Qwen3 with its output layer x20: peaked next-token distributions like a trained model's (the
    random tiny model's are nearly uniform, where no divergence can show)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    out = tmp_path_factory.mktemp("teacher") / "tiny-sharp"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen3_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ext_model(qwen_ext, teacher_dir, tmp_path_factory):
    """The teacher extended with the 64-token extension (what `trkit embed` writes)."""
    out = tmp_path_factory.mktemp("extmodel") / "model"
    embeddings.extend_checkpoint(teacher_dir, qwen_ext, out, init="fvt", output_init="first", progress=False)
    return out


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory):
    """40 short English documents and 8 Turkish ones: long stretches without new tokens (where the student must
    equal the teacher) and Turkish text where new tokens appear."""
    from trkit import assets
    from trkit.evaluation import read_documents

    tr = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:8]
    en = [d for d in read_documents(assets.english_file()) if 50 < len(d) < 400][:40]
    path = tmp_path_factory.mktemp("mix") / "mix.txt"
    path.write_text("\n".join(tr + en) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, mix_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher"
    r = distill.cache_teacher_logits(str(teacher_dir), [str(mix_file)], out, seq_len=64, profile="cpu",
                                     dtype="float32", shard_positions=256, progress=False)
    assert r.shards_computed == len(r.plan["shards"]) >= 2 and r.shards_skipped == 0
    return out


def _student(ext_model, mix_file, cache_dir, seq_len=64, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ext_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ext_model)
    docs = packing.document_stream([str(mix_file)], seed=0)
    packed = packing.pack_text(tok, docs, seq_len)
    cache = distill.TeacherCache(cache_dir)
    vmap = distill.vocabulary_map(tok, model.get_output_embeddings().weight.shape[0], cache.tokenizer_dir,
                                  [str(ext_model)])
    kd = distill.DistillLoss(cache, vmap, packed, packing.token_byte_lengths(tok), **kw)
    return model, kd, packed


def _with_new_logits(monkeypatch, fn):
    """Run the student with its new rows' (and padding rows') logits replaced by ``fn(z)``."""
    original = losses.chunk_logits

    def patched(h, parts, delta):
        z = original(h, parts, delta)
        return torch.cat([z[:, :BASE], fn(z)], dim=1)

    monkeypatch.setattr(losses, "chunk_logits", patched)


# --------------------------------------------------------------------------------------------


def test_records_are_compact_and_lossless():
    rng = np.random.default_rng(0)
    qwen = distill.Layout.for_vocabulary(32, 151669, 128)
    assert qwen.id_bits == 18 and qwen.record_bytes == 136 and qwen.bytes_per_position == 137 <= 140
    smol = distill.Layout.for_vocabulary(32, 49152, 81)
    assert smol.id_bits == 16 and smol.bytes_per_position == 129
    n = 500
    ids = rng.integers(0, 151669, size=(n, 32))
    ids[0, :3] = [0, 151668, 2**17]
    lps = -np.abs(rng.standard_normal((n, 32)) * 10).astype(np.float32)
    lps[0, :4] = [0.0, -0.0, -65504.0, -1e-7]  # edges: zeros, the largest fp16, a subnormal
    realised = -np.abs(rng.standard_normal(n) * 5).astype(np.float32)
    realised[1] = -np.inf  # "no next token"
    rest = -np.abs(rng.standard_normal(n)).astype(np.float32)
    rest[2] = 1e-8  # a rounding-positive log-mass is clamped to 0
    rec = distill.pack_records(qwen, ids, lps, realised, rest)
    assert rec.shape == (n, 136) and rec.dtype == np.uint8
    i2, l2, r2, s2 = distill.unpack_records(qwen, rec)
    assert (i2 == ids).all()
    assert np.array_equal(l2, lps.astype(np.float16).astype(np.float32))  # exactly the fp16 values
    assert np.array_equal(r2, realised.astype(np.float16).astype(np.float32))
    assert np.array_equal(s2, np.minimum(rest, 0).astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="18-bit"):
        distill.pack_records(qwen, ids + 2**18, lps, realised, rest)


def test_offsets_are_rebuilt_exactly_from_byte_lengths(qwen3_tokenizer):
    texts = ["Ağaç dalında kuş öttü.", "", "İstanbul'da yağmur var; çiçekler açtı.", "ğğğ şşş " * 9, "x"]
    packed = packing.pack_text(qwen3_tokenizer, packing.Documents(texts, "t", "x"), seq_len=7)
    flat_ids, flat_end = packed.input_ids.reshape(-1), packed.end_byte.reshape(-1)
    lengths = np.where(flat_end == 0, 0, packing.token_byte_lengths(qwen3_tokenizer)[flat_ids])
    first = np.arange(len(packed)) * 7
    piece_doc = distill.piece_documents(flat_end, first)
    doc, end = distill.rebuild_offsets(lengths, piece_doc, flat_end[first], 7)
    assert (doc == packed.doc.reshape(-1)).all() and (end == flat_end).all()


def test_extension_constituents_from_merges_equal_the_manifest(qwen_ext, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    tj = json.loads(Path(qwen_ext.directory, "tokenizer.json").read_text(encoding="utf-8"))
    base = json.loads(Path(qwen3_tokenizer_dir, "tokenizer.json").read_text(encoding="utf-8"))
    assert distill._constituents_from_merges(tj, base) == qwen_ext.constituents
    assert distill._constituents_from_merges(base, tj) is None  # the base is no extension of its extension
    tok = AutoTokenizer.from_pretrained(qwen_ext.directory)
    with_manifest = distill.vocabulary_map(tok, 151936, qwen3_tokenizer_dir, [qwen_ext.directory])
    from_merges = distill.vocabulary_map(tok, 151936, qwen3_tokenizer_dir, [])
    assert with_manifest.kind == from_merges.kind == "extended"
    assert (with_manifest.first == from_merges.first).all() and with_manifest.new_lo == BASE
    same = distill.vocabulary_map(AutoTokenizer.from_pretrained(qwen3_tokenizer_dir), 151936, qwen3_tokenizer_dir)
    assert same.kind == "same"


def test_cache_manifest_plan_and_every_student_boundary_found(cache_dir, ext_model, mix_file):
    from trkit.artifacts import read_manifest

    manifest = read_manifest(cache_dir, verify=True)
    assert manifest["stage"] == "distill-cache" and manifest["top_k"] == 32
    cache = distill.TeacherCache(cache_dir)
    summary = cache.summary()
    assert summary["positions"] == len(cache) and 137 <= summary["bytes_per_position"] < 140
    docs = packing.document_stream([str(mix_file)], seed=0)
    assert summary["text_sha256"] == docs.sha256
    # the teacher's own packing: its offsets are the cache's
    from transformers import AutoTokenizer

    teacher = packing.pack_text(AutoTokenizer.from_pretrained(cache.tokenizer_dir), docs, 64)
    assert (cache.keys == distill._key(teacher.doc.reshape(-1), teacher.end_byte.reshape(-1))).all()
    # an extension only merges: every student token ends on a teacher boundary
    _, kd, packed = _student(ext_model, mix_file, cache_dir)
    keys = distill._key(packed.doc.reshape(-1), packed.end_byte.reshape(-1))
    inside = keys <= cache.keys[-1]
    assert (cache.find(keys[inside]) >= 0).all()


def test_exactness_kd_is_zero_where_the_context_has_no_new_token(ext_model, mix_file, cache_dir, monkeypatch):
    """Student = teacher + new rows whose logits are -inf: KD 0 (to fp16 storage) at every aligned position whose
    context (the same history for both) holds no new token, in rest mode at T = 1 and T = 2; renormalized mode
    gives exactly -log(teacher top-k mass) there. Real rows that take mass: KD > 0 at those positions."""
    model, kd, packed = _student(ext_model, mix_file, cache_dir)
    batch = packed.batch(list(range(len(packed))))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    parts = losses.head_parts(model)
    rows = kd.per_position(hidden, parts, batch["labels"], batch["block_index"])["rows"]
    b, t = rows // packed.seq_len, rows % packed.seq_len
    j = kd._align(b, t)
    new_in_context = np.cumsum(batch["input_ids"].numpy() >= BASE, axis=1)[b, t] > 0
    same_history = (j >= 0) & (kd.cache.history_start(np.maximum(j, 0)) == kd.block_start[b])
    exact = same_history & ~new_in_context
    assert exact.sum() >= 50 and (new_in_context & (j >= 0)).sum() >= 50
    _with_new_logits(monkeypatch, lambda z: torch.full_like(z[:, BASE:], -math.inf))
    worst = {}
    for mode, T in (("rest", 1.0), ("rest", 2.0), ("renormalized", 1.0)):
        kd.mode, kd.temperature = mode, T
        r = kd.per_position(hidden, parts, batch["labels"], batch["block_index"])
        if mode == "rest":
            worst[T] = float(np.abs(r["kd"][exact]).max())
            assert worst[T] < 1e-5, (mode, T, worst[T])
            assert np.nanmin(r["kd"]) > -1e-5  # a proper KL everywhere
        else:
            top_mass = np.exp(kd.cache.records(j[exact])[1].astype(np.float64)).sum(1)
            assert np.allclose(r["kd"][exact], -np.log(top_mass), atol=4e-3)  # fp16 spacing at |log p| ~ 12: 2^-7
    print(f"exactness: max |KD| at {int(exact.sum())} positions: T=1 {worst[1.0]:.2e}, T=2 {worst[2.0]:.2e}")
    # real rows that take mass: each new token as likely as the teacher's top token
    _with_new_logits(monkeypatch, lambda z: z[:, :BASE].max(1, keepdim=True).values.expand(-1, z.shape[1] - BASE).clone())
    kd.mode, kd.temperature = "rest", 1.0
    r = kd.per_position(hidden, parts, batch["labels"], batch["block_index"])
    after_separator = packed.end_byte[batch["block_index"].numpy()[b], t] == 0  # the tiny model predicts uniformly there
    assert (r["kd"][exact & ~after_separator] > 1000 * worst[1.0]).all()


def _reference_rest_kl(z, ids, lps, rest, targets_of_rows, V, T):
    """A direct float64 computation: p_S over all rows, summed onto teacher ids, (k+1) coarsening, tempered."""
    p = torch.softmax(z.double(), -1)
    mapped = torch.zeros(z.shape[0], V + 1, dtype=torch.float64)
    mapped.index_add_(1, torch.as_tensor(targets_of_rows), p)
    s_k = mapped.gather(1, ids)
    s = torch.cat([s_k, 1 - s_k.sum(1, keepdim=True)], 1).log()
    q = torch.cat([lps.double(), rest.double()[:, None]], 1)
    s, q = torch.log_softmax(s / T, 1), torch.log_softmax(q / T, 1)
    return (q.exp() * (q - s)).sum(1)


def test_kd_loss_matches_a_dense_reference_and_its_chunked_gradients(ext_model, mix_file, cache_dir):
    model, kd, packed = _student(ext_model, mix_file, cache_dir, seq_len=32, temperature=2.0, weight=0.7,
                                 chain_weight=0.5)
    with_new = [int(b) for b in np.nonzero((packed.input_ids >= BASE).any(1))[0]]
    blocks = [with_new[0], 0, with_new[-1]]  # new tokens (chain term), and English
    batch = packed.batch(blocks)
    parts = losses.head_parts(model)
    with torch.no_grad():  # give the new rows mass, so the first-constituent mapping matters
        parts.weight[BASE : BASE + 64] *= 3
    hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state.detach().requires_grad_(True)
    total, n, terms = kd.loss(hidden, parts, batch["labels"], batch["block_index"], chunk=7)
    assert n == packed.label_count(blocks) and terms["kd/masked"] < n
    total.backward()
    g_chunked = hidden.grad.clone()
    # the same sum with one dense autograd graph
    hidden.grad = None
    rows, targets = losses.shifted_targets(batch["labels"])
    valid, ids, lps, rest, chain, chain_lp = kd._teacher(rows.numpy(), targets.numpy(), 32, batch["block_index"].numpy(), "cpu")
    z = losses.chunk_logits(hidden.reshape(-1, hidden.shape[-1])[rows], parts, None)
    t = kd.terms(z[valid], targets[valid], ids[valid], lps[valid], rest[valid], chain[valid], chain_lp[valid])
    ce = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    dense = ce[~valid].sum() + ((1 - 0.7) * ce[valid] + 0.7 * (4.0 * t["kd"] + 0.5 * t["chain"])).sum()
    dense.backward()
    assert abs(float(total.detach()) - float(dense.detach())) < 1e-4 * abs(float(dense.detach()))
    # chunked and dense graphs sum in different orders: compare against the gradient's own scale
    err = float((g_chunked - hidden.grad).abs().max())
    print(f"chunked vs dense grad max |diff| {err:.3g}, max |grad| {float(hidden.grad.abs().max()):.3g}")
    assert err <= 1e-4 * float(hidden.grad.abs().max()), err
    assert terms["kd/chain_positions"] > 0 and terms["kd/chain"] > 0
    # and the KL itself against a plain float64 computation
    targets_of_rows = distill.row_targets(kd.vmap, z.shape[1])
    ref = _reference_rest_kl(z[valid].detach(), ids[valid], lps[valid], rest[valid], targets_of_rows, BASE, 2.0)
    assert torch.allclose(t["kd"].detach().double(), ref, atol=2e-5), float((t["kd"].double() - ref).abs().max())
    assert float(ref.max()) > 1e-3


def _cfg(ext_model, mix_file, out, cache_dir, **kw):
    base = dict(model=str(ext_model), out=str(out), corpus=[str(mix_file)], max_steps=3, seq_len=32, batch_size=2,
                eval_chars=0, profile="cpu", dtype="float32", progress=False, save_steps=2, distill=str(cache_dir),
                kd_temperature=2.0)
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.mark.parametrize("stage,adapter,dtype", [("rows", "none", "float32"), ("adapters", "dora", "bfloat16"),
                                                 ("adapters", "lora", "float16")])
def test_training_with_distill(ext_model, mix_file, cache_dir, tmp_path, stage, adapter, dtype):
    result = train.train(_cfg(ext_model, mix_file, tmp_path / "run", cache_dir, stage=stage, adapter=adapter,
                              dtype=dtype, lr=1e-2, embedding_lr=1e-2))
    log = [r for r in result.log if "loss" in r]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    assert all(0 <= r["kd/masked"] < 0.5 and r["kd/kl"] > 0 and r["kd/ce"] > 0 for r in log)
    # loss = [sum_masked CE + sum_valid (0.5 CE + 0.5 T^2 KL)] / N: between the bounds the logged sums give
    for r in log:
        assert 0.5 * r["kd/ce"] + 2 * r["kd/kl"] - 1e-4 <= r["loss"] <= r["kd/ce"] + 2 * r["kd/kl"] + 1e-4
    assert (result.adapter / "adapter_model.safetensors").is_file()


def test_distill_run_resumes_exactly(ext_model, mix_file, cache_dir, tmp_path):
    """The KD loss is a pure function of the cache and the batch: a run resumed from checkpoint 2 ends equal."""
    from safetensors.torch import load_file

    kw = dict(max_steps=4, save_steps=2, adapter="dora", lr=1e-2, embedding_lr=1e-2, kd_chain_weight=0.3)
    a = train.train(_cfg(ext_model, mix_file, tmp_path / "a", cache_dir, **kw))
    b = train.train(_cfg(ext_model, mix_file, tmp_path / "b", cache_dir, **kw))
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-4"), shutil.rmtree(tmp_path / "b" / "adapter")
    b = train.train(_cfg(ext_model, mix_file, tmp_path / "b", cache_dir, **kw))
    assert b.resumed_from == 2
    ta, tb = load_file(str(a.adapter / "adapter_model.safetensors")), load_file(str(b.adapter / "adapter_model.safetensors"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [r["loss"] for r in a.log if "loss" in r] == [r["loss"] for r in b.log if "loss" in r]


@pytest.fixture(scope="module")
def foreign_cache(mix_file, smollm2_dir, tmp_path_factory):
    """A cache from a tiny random Llama with SmolLM2's tokenizer: another tokenizer family than Qwen3's."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    d = tmp_path_factory.mktemp("foreign") / "teacher"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = d.parent / "cache"
    distill.cache_teacher_logits(str(d), [str(mix_file)], out, top_k=8, seq_len=64, profile="cpu", dtype="float32",
                                 progress=False)
    return out


def test_refusals_and_the_uld_fallback(ext_model, mix_file, cache_dir, foreign_cache, tmp_path):
    with pytest.raises(ValueError, match="--loss chunked"):
        _cfg(ext_model, mix_file, tmp_path / "a", cache_dir, loss="full").validate()
    with pytest.raises(ValueError, match="other text"):
        train.train(_cfg(ext_model, mix_file, tmp_path / "b", cache_dir, seed=1))
    with pytest.raises(ValueError, match="--kd-mode uld"):
        train.train(_cfg(ext_model, mix_file, tmp_path / "c", foreign_cache))
    with pytest.raises(ValueError, match="temperature 1"):
        train.train(_cfg(ext_model, mix_file, tmp_path / "d", foreign_cache, kd_mode="uld"))
    with pytest.warns(UserWarning, match="ignores which token is which"):
        result = train.train(_cfg(ext_model, mix_file, tmp_path / "e", foreign_cache, kd_mode="uld",
                                  kd_temperature=1.0, max_steps=2, save_steps=0))
    log = [r for r in result.log if "loss" in r]
    # ULD aligns only where both tokenizations end a token at the same byte
    assert 0 < log[0]["kd/masked"] < 1 and 0 < log[0]["kd/kl"] <= 2
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / distill.PLAN_NAME).write_text("{}")
    with pytest.raises(ValueError, match="unfinished"):
        distill.TeacherCache(unfinished)


def _cache_cli(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "trkit", "distill", "cache", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "trkit_manifest.json"}


def test_cache_killed_then_resumed_is_byte_identical(teacher_dir, mix_file, cache_dir, tmp_path):
    """A real process killed with SIGKILL mid-cache, rerun, gives the same bytes as the uninterrupted cache (the
    fixture's, same settings); a truncated shard is redone; other settings are refused."""
    args = ["--teacher", str(teacher_dir), "--corpus", str(mix_file), "--seq-len", "64", "--profile", "cpu",
            "--dtype", "float32", "--shard-positions", "256", "--quiet"]
    out = tmp_path / "cache"
    killed = _cache_cli([*args, "--out", str(out)])
    deadline = time.time() + 300
    while not list((out / distill.SHARD_DIR).glob("*.json")) if (out / distill.SHARD_DIR).is_dir() else True:
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read() if killed.poll() else "timeout"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (out / "trkit_manifest.json").exists()  # killed before the end: the test resumes something
    with pytest.raises(ValueError, match="unfinished"):
        distill.TeacherCache(out)
    resumed = _cache_cli([*args, "--out", str(out), "--json"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["shards_skipped"] >= 1 and report["shards_computed"] >= 1
    assert _files(out) == _files(cache_dir)
    # a truncated shard is found by its hash and redone; the rest is kept
    shard = out / distill.SHARD_DIR / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = distill.cache_teacher_logits(str(teacher_dir), [str(mix_file)], out, seq_len=64, profile="cpu",
                                     dtype="float32", shard_positions=256, progress=False)
    assert r.shards_computed == 1 and r.shards_skipped == len(r.plan["shards"]) - 1
    assert _files(out) == _files(cache_dir)
    distill.TeacherCache(out)  # verifies every shard
    with pytest.raises(ValueError, match="top_k"):
        distill.cache_teacher_logits(str(teacher_dir), [str(mix_file)], out, top_k=8, seq_len=64, profile="cpu",
                                     dtype="float32", shard_positions=256, progress=False)


def test_cache_cli_checks_before_loading(tiny_qwen3_dir, mix_file, tmp_path):
    from trkit.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert main(["distill", "cache", "--teacher", str(tiny_qwen3_dir), "--corpus", str(mix_file), "--out", str(mine),
                 "--profile", "cpu"]) == 2
    assert main(["distill", "cache", "--teacher", str(tiny_qwen3_dir), "--corpus", str(mix_file), "--out",
                 str(tmp_path / "x"), "--seq-len", "64", "--stride", "48", "--profile", "cpu"]) == 2
    with pytest.raises(SystemExit):
        main(["distill", "cache", "--teacher", "x", "--out", str(tmp_path / "y"), "--top-k", "0"])
    plan = distill.cache_teacher_logits(str(tiny_qwen3_dir), [str(mix_file)], tmp_path / "p", seq_len=64, stride=32,
                                        profile="cpu", plan_only=True, progress=False)
    assert not (tmp_path / "p").exists() and plan.bytes == plan.plan["bytes"] > 0
    assert plan.plan["forward_tokens"] > plan.positions  # windows of 2 pieces: about twice the work


@pytest.mark.slow
def test_smollm2_exactness_and_real_rows(smollm2_dir, tmp_path, monkeypatch):
    """SmolLM2 (real weights) as its own teacher: the extended student with -inf new rows has KD 0 where the context
    holds no new token; with its real (`fvt`) rows the loss is positive there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trkit import assets
    from trkit.evaluation import read_documents
    from trkit.vocab import extend_tokenizer

    tr = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()
    ext = tmp_path / "ext"
    extend_tokenizer("smollm2", tr[:400], n_new_tokens=256, out_dir=ext, progress=False)
    student = tmp_path / "student"
    embeddings.extend_checkpoint(smollm2_dir, ext, student, init="fvt", output_init="fvt", progress=False)
    en = [d for d in read_documents(assets.english_file()) if 50 < len(d) < 400][:12]
    corpus = tmp_path / "mix.txt"
    corpus.write_text("\n".join(tr[400:404] + en) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    distill.cache_teacher_logits(str(smollm2_dir), [str(corpus)], cache, seq_len=128, profile="cpu", dtype="float32",
                                 progress=False)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(student)
    packed = packing.pack_text(tok, packing.document_stream([str(corpus)], seed=0), 128)
    tc = distill.TeacherCache(cache)
    base = len(AutoTokenizer.from_pretrained(smollm2_dir))
    vmap = distill.vocabulary_map(tok, model.get_output_embeddings().weight.shape[0], tc.tokenizer_dir, [str(student)])
    assert vmap.kind == "extended" and vmap.new_lo == base
    kd = distill.DistillLoss(tc, vmap, packed, packing.token_byte_lengths(tok))
    batch = packed.batch(list(range(len(packed))))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    parts = losses.head_parts(model)
    original = losses.chunk_logits
    monkeypatch.setattr(losses, "chunk_logits", lambda h, p, d: original(h, p, d).index_fill_(
        1, torch.arange(base, p.weight.shape[0]), -math.inf))
    r = kd.per_position(hidden, parts, batch["labels"], batch["block_index"])
    b, t = r["rows"] // 128, r["rows"] % 128
    j = kd._align(b, t)
    exact = ((j >= 0) & (tc.history_start(np.maximum(j, 0)) == kd.block_start[b])
             & ~(np.cumsum(batch["input_ids"].numpy() >= base, axis=1)[b, t] > 0))
    assert exact.sum() >= 100
    worst = float(np.abs(r["kd"][exact]).max())
    print(f"SmolLM2 exactness: max |KD| {worst:.2e} at {int(exact.sum())} positions")
    assert worst < 1e-3
    monkeypatch.setattr(losses, "chunk_logits", original)
    real = kd.per_position(hidden, parts, batch["labels"], batch["block_index"])
    turkish = real["valid"] & ~exact
    print(f"SmolLM2 real rows: mean KD {real['kd'][exact].mean():.2e} there, {real['kd'][turkish].mean():.2e} where "
          "the context holds new tokens")
    # positive (new tokens take some mass even in English contexts), far more so in Turkish ones
    assert (real["kd"][exact] > -2 * worst).all() and real["kd"][exact].mean() > 100 * worst
    assert real["kd"][turkish].mean() > 10 * real["kd"][exact].mean()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_qlora_teacher_and_student_on_gpu(teacher_dir, ext_model, mix_file, tmp_path, dtype):
    """The GPU path: an NF4 teacher writes the cache (profile 'gpu': 4-bit), a QLoRA DoRA student trains with it."""
    out = tmp_path / "cache"
    r = distill.cache_teacher_logits(str(teacher_dir), [str(mix_file)], out, seq_len=64, profile="gpu", dtype=dtype,
                                     progress=False)
    assert r.plan["load_in_4bit"] and r.bytes_per_position < 140
    result = train.train(_cfg(ext_model, mix_file, tmp_path / "run", out, profile="gpu", dtype=dtype, adapter="dora",
                              max_steps=2, save_steps=0))
    log = [x for x in result.log if "loss" in x]
    assert len(log) == 2 and all(math.isfinite(x["loss"]) and x["kd/kl"] > 0 for x in log)
