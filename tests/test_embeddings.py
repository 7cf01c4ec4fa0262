"""Embedding surgery: row init rules, both paths identical, bad input, PEFT helpers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trkit import checkpoints
from trkit import embeddings as emb


def _tensors(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_init_rules(qwen_ext):
    ext = qwen_ext
    torch.manual_seed(0)
    rows = ext.rows(151936)
    w = torch.randn(rows, 8)
    trained = w[: ext.base_vocab_size].clone()
    for method in emb.OUTPUT_INITS:
        if method == "fvt_offset":
            continue
        x = w.clone()
        emb.init_new_rows(x, ext, method, seed=3)
        assert torch.equal(x[: ext.base_vocab_size], trained)  # trained rows untouched
        pad = x[ext.vocab_size :]
        assert torch.allclose(pad, trained.mean(0).expand_as(pad), atol=1e-6)  # padding rows: trained mean
        i = ext.new_ids[5]
        parts = ext.constituents[i]
        expected = {"fvt": trained[parts].mean(0), "first": trained[parts[0]], "mean": trained.mean(0)}.get(method)
        if expected is not None:
            assert torch.allclose(x[i], expected, atol=1e-6)
        else:  # random: N(0, 0.02), reproducible from the seed
            new = x[ext.base_vocab_size : ext.vocab_size]
            assert abs(new.std().item() - emb.RANDOM_STD) < 0.005
            y = w.clone()
            emb.init_new_rows(y, ext, "random", seed=3)
            assert torch.equal(x, y)
    d = torch.zeros(8)
    d[0] = 1.0
    b = -torch.arange(len(ext.new_ids), dtype=torch.float32) / 10
    stats = emb.OffsetStats(direction=d, log_continuation=b, scale=0.5)
    x = w.clone()
    emb.init_new_rows(x, ext, "fvt_offset", offsets=stats)
    for j in (0, 7):
        i = ext.new_ids[j]
        assert torch.allclose(x[i], trained[ext.constituents[i]].mean(0) + 0.5 * b[j] * d, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        emb.init_new_rows(x, ext, "fvt_offset", offsets=emb.OffsetStats(torch.zeros(4), b))
    # the base half: every base row moves by t a_c d_L, the new rows do not; t = 0 (or no statistics) changes nothing
    a = -torch.rand(ext.base_vocab_size)
    d_lang = torch.randn(8)
    y = x.clone()
    emb.correct_base_rows(y, ext, emb.OffsetStats(d, b, 0.5, base_log_share=a, language_direction=d_lang, base_scale=0.5))
    assert torch.allclose(y[: ext.base_vocab_size], x[: ext.base_vocab_size] + 0.5 * a[:, None] * d_lang, atol=1e-6)
    assert torch.equal(y[ext.base_vocab_size :], x[ext.base_vocab_size :])
    for off in (stats, emb.OffsetStats(d, b, 0.5, base_log_share=a, language_direction=d_lang, base_scale=0.0), None):
        z = x.clone()
        emb.correct_base_rows(z, ext, off)
        assert torch.equal(z, x)


def test_every_id_from_base_is_reinitialised(qwen_ext):
    """Qwen3-8B's 267 unused padding rows (151,669..151,935) are not kept as they were."""
    w = torch.full((151936, 4), 7.0)
    w[: qwen_ext.base_vocab_size] = torch.randn(qwen_ext.base_vocab_size, 4)
    emb.init_new_rows(w, qwen_ext, "fvt")
    assert not (w[qwen_ext.base_vocab_size :] == 7.0).any()


@pytest.mark.parametrize("init,output_init", [("fvt", "first"), ("random", "fvt_offset")])
def test_checkpoint_and_in_memory_paths_agree_untied(qwen_ext, tiny_qwen3_dir, tmp_path, init, output_init):
    from transformers import AutoModelForCausalLM

    from trkit import assets

    stats = emb.OffsetStats(torch.linspace(-1, 1, 64), -torch.rand(len(qwen_ext.new_ids)) * 5, scale=0.5,
                            base_log_share=-torch.rand(qwen_ext.base_vocab_size) * 3,
                            language_direction=torch.linspace(1, -1, 64) / 8, base_scale=0.75)
    out = tmp_path / "ext"
    manifest = emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, out, init=init, output_init=output_init,
                                     offsets=stats, progress=False)
    model = emb.extend_model(assets.tiny_qwen3(), qwen_ext, init=init, output_init=output_init, offsets=stats,
                             base_tokenizer=tiny_qwen3_dir)
    on_disk = _tensors(out)
    state = model.state_dict()
    assert set(on_disk) == set(state)
    for k, v in on_disk.items():
        assert torch.equal(v, state[k]), k
    source = _tensors(tiny_qwen3_dir)
    for k, v in source.items():  # untouched tensors copied byte for byte
        if "embed_tokens" not in k and "lm_head" not in k:
            assert torch.equal(v, on_disk[k])
        elif k == "lm_head.weight" and output_init == "fvt_offset":  # base rows: u_c + t a_c d_L
            want = v[: qwen_ext.base_vocab_size].float() + 0.75 * stats.base_log_share[:, None] * stats.language_direction
            assert torch.allclose(on_disk[k][: qwen_ext.base_vocab_size].float(), want, atol=1e-6)
        else:
            assert torch.equal(v[: qwen_ext.base_vocab_size], on_disk[k][: qwen_ext.base_vocab_size])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == on_disk["lm_head.weight"].shape[0] == 151936  # 151,733 fits the old rows
    assert manifest["rows"] == 151936 and manifest["untied"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == qwen_ext.vocab_size
    text = "Bir " + " ".join(tok.decode([i]) for i in qwen_ext.new_ids[:8])
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.max() >= qwen_ext.base_vocab_size  # the new tokens are used
    assert torch.isfinite(loaded(ids).logits).all()
    # the manifest's hashes detect a damaged output
    from trkit.artifacts import read_manifest

    read_manifest(out, verify=True)


@pytest.mark.parametrize("output_init,untied", [("fvt", False), ("first", True)])
def test_tied_model_both_paths(qwen_ext, tied_dir, tmp_path, output_init, untied):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ext"
    emb.extend_checkpoint(tied_dir, qwen_ext, out, init="fvt", output_init=output_init, progress=False)
    on_disk = _tensors(out)
    assert ("lm_head.weight" in on_disk) == untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is (not untied)
    model = emb.extend_model(AutoModelForCausalLM.from_pretrained(tied_dir), qwen_ext, init="fvt",
                             output_init=output_init)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (not untied)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    if untied:
        i = qwen_ext.new_ids[0]
        assert torch.equal(loaded.lm_head.weight[i], loaded.model.embed_tokens.weight[qwen_ext.constituents[i][0]])
        assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_padding_to_multiple_of_64(tied_dir, tmp_path, qwen3_tokenizer_dir):
    """An extension past the existing rows grows the matrix to a multiple of 64."""
    ext = emb.Extension(directory=tmp_path, base_vocab_size=151669, vocab_size=151669 + 300, base_fingerprint="x",
                        constituents={})
    assert ext.rows(151936) == 152000 and emb.padded_size(151969) == 152000
    assert emb.padded_size(64) == 64 and ext.rows(160000) == 160000


def test_sharded_checkpoint(qwen_ext, tiny_qwen3_dir, tmp_path):
    """A multi-shard checkpoint: only the shards holding the matrices are rewritten, the rest linked."""
    from trkit import assets

    src = tmp_path / "sharded"
    model = assets.tiny_qwen3()
    model.save_pretrained(src, max_shard_size="20MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_qwen3_dir / f, src / f)
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    manifest = emb.extend_checkpoint(src, qwen_ext, out, init="fvt", output_init="first", progress=False)
    assert "linked" in manifest["shards"].values() or "copied" in manifest["shards"].values()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = _tensors(out)
    assert set(index["weight_map"]) == set(on_disk)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in on_disk.values())
    ref = emb.extend_model(assets.tiny_qwen3(), qwen_ext, init="fvt", output_init="first")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, on_disk[k]), k


def _sharded(tmp_path, tiny_qwen3_dir, name="sharded"):
    from trkit import assets

    src = tmp_path / name
    assets.tiny_qwen3().save_pretrained(src, max_shard_size="20MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_qwen3_dir / f, src / f)
    return src


def test_index_total_parameters_is_updated(qwen_ext, tiny_qwen3_dir, tmp_path):
    """Issue 9 item 9: the rewritten index kept a stale metadata.total_parameters."""
    src = _sharded(tmp_path, tiny_qwen3_dir)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_parameters"] = 12345  # what a checkpoint of another vocabulary size would say
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    emb.extend_checkpoint(src, qwen_ext, out, init="fvt", output_init="first", progress=False)
    on_disk = _tensors(out)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_parameters"] == sum(v.numel() for v in on_disk.values())


def test_truncated_untouched_shard_is_refused(qwen_ext, tiny_qwen3_dir, tmp_path):
    """Issue 10 item 1: a truncated shard that is only linked must be refused, naming it, before any output."""
    src = _sharded(tmp_path, tiny_qwen3_dir)
    wmap = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {wmap["model.embed_tokens.weight"], wmap["lm_head.weight"]}
    victim = next(src / f for f in sorted(set(wmap.values())) if f not in touched)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{victim.name}.*re-download"):
        emb.extend_checkpoint(src, qwen_ext, out, init="fvt", output_init="first", progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sharded"]


@pytest.mark.parametrize("same", [True, False])
def test_tied_checkpoint_that_stores_lm_head(qwen_ext, tied_dir, tmp_path, same):
    """Issue 9 item 8: a tied config whose checkpoint also stores lm_head.weight is decided per file."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "tied-with-head"
    shutil.copytree(tied_dir, src)
    tensors = load_file(src / "model.safetensors")
    head = tensors["model.embed_tokens.weight"].clone()
    if not same:
        head[:10] += 1.0  # a fine-tune that trained the head on its own
    tensors["lm_head.weight"] = head
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    manifest = emb.extend_checkpoint(src, qwen_ext, out, init="fvt", output_init="fvt", progress=False)
    config = json.loads((out / "config.json").read_text())
    got = _tensors(out)
    if same:
        assert manifest["tied"] and config["tie_word_embeddings"] is True
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    else:
        assert not manifest["tied"] and config["tie_word_embeddings"] is False
        assert "differs" in manifest["tie_decision"]
        # the stored head keeps its own trained rows and gets its own new rows
        assert torch.equal(got["lm_head.weight"][:10], head[:10])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, got["lm_head.weight"])


def test_bad_input(qwen_ext, tiny_qwen3_dir, tmp_path, qwen3_tokenizer_dir):
    # a checkpoint whose tokenizer is not the extension's base
    from trkit import assets

    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_qwen3_dir, wrong)
    shutil.copyfile(assets.smollm2_dir() / "tokenizer.json", wrong / "tokenizer.json")
    with pytest.raises(ValueError, match="not the base"):
        emb.extend_checkpoint(wrong, qwen_ext, tmp_path / "o1", progress=False, output_init="first")
    # an "extension" that moved an existing id
    moved = tmp_path / "moved"
    shutil.copytree(qwen_ext.directory, moved)
    tj = json.loads((moved / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (moved / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    ext_moved = emb.Extension(moved, qwen_ext.base_vocab_size, qwen_ext.vocab_size, qwen_ext.base_fingerprint,
                              qwen_ext.constituents)
    with pytest.raises(ValueError, match="changed id"):
        emb.check_tokenizer_pair(ext_moved, tiny_qwen3_dir)
    with pytest.raises(ValueError, match="sha256"):  # and the manifest hash catches the edit on load
        emb.load_extension(moved)
    # NaN rows in the checkpoint
    from safetensors.torch import load_file, save_file

    nan_dir = tmp_path / "nan"
    shutil.copytree(tiny_qwen3_dir, nan_dir)
    tensors = load_file(nan_dir / "model.safetensors")
    tensors["model.embed_tokens.weight"][123, 5] = float("nan")
    save_file(tensors, nan_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="row 123 holds NaN"):
        emb.extend_checkpoint(nan_dir, qwen_ext, tmp_path / "o2", progress=False, output_init="first")
    assert not (tmp_path / "o2").exists()  # nothing half-written
    # unknown rules, missing joint stats, existing output
    with pytest.raises(ValueError, match="unknown input init"):
        emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, tmp_path / "o3", init="first", progress=False)
    with pytest.raises(ValueError, match="fvt_offset"):
        emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, tmp_path / "o3", output_init="fvt_offset", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, tmp_path / "exists", output_init="first", progress=False)


def test_streaming_writer_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    a = torch.randn(5, 3).to(torch.bfloat16)
    b = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"a": a, "b": b}, tmp_path / "src.safetensors")
    hdr, start = checkpoints.read_safetensors_header(tmp_path / "src.safetensors")
    lo, hi = hdr["a"]["data_offsets"]
    c = torch.randn(2, 2, dtype=torch.float16)
    checkpoints.write_safetensors_streaming(tmp_path / "out.safetensors", [
        ("c", "F16", [2, 2], lambda: c),
        ("a", "BF16", [5, 3], (tmp_path / "src.safetensors", start + lo, start + hi)),
    ], {"format": "pt"}, copy_chunk=7)
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["c"], c) and set(got) == {"a", "c"}


def test_log_continuation_counts(qwen_ext, qwen3_tokenizer):
    from transformers import AutoTokenizer

    ext_tok = AutoTokenizer.from_pretrained(qwen_ext.directory)
    j = 3
    w = qwen_ext.new_ids[j]
    text = ext_tok.decode([w])
    docs = [f"{text} {text}", "x" + text, "nothing here"]
    b = emb.log_continuation(qwen_ext, qwen3_tokenizer, ext_tok, docs)
    assert b.shape == (len(qwen_ext.new_ids),) and (b <= 0).all()
    n_ext = sum(ids.count(w) for ids in ext_tok(docs, add_special_tokens=False)["input_ids"])
    c1 = qwen_ext.constituents[w][0]
    n_base = sum(ids.count(c1) for ids in qwen3_tokenizer(docs, add_special_tokens=False)["input_ids"])
    assert n_ext >= 1 and b[j].item() == pytest.approx(min(0.0, float(torch.log(torch.tensor((n_ext + 0.5) / (n_base + 1))))))


def test_constant_direction():
    torch.manual_seed(0)
    h = torch.randn(500, 16)
    h[:, 3] = 4.0  # a constant component, as final RMSNorm outputs have
    d = emb.constant_direction(h)
    assert torch.allclose(h @ d, torch.ones(500), atol=1e-2)


def test_estimate_offset_stats_and_roundtrip(qwen_ext, qwen3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from trkit import assets

    ext_tok = AutoTokenizer.from_pretrained(qwen_ext.directory)
    turkish = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:40]
    english = ["The quick brown fox jumps over the lazy dog.", "Assert statements are a convenient way to debug."]
    model = assets.tiny_qwen3()
    stats = emb.estimate_offset_stats(model, qwen_ext, qwen3_tokenizer, ext_tok, turkish, english)
    assert model.get_input_embeddings().weight.shape[0] == qwen_ext.rows(151936)  # extended in place (fvt)
    assert stats.scale in emb.OFFSET_SCALES and stats.direction.shape == (64,)
    assert (stats.log_continuation <= 0).all() and stats.log_continuation.shape == (len(qwen_ext.new_ids),)
    rep = stats.report
    assert set(rep["turkish_nll_per_token"]) == set(rep["english_relative_change"]) == {str(s) for s in emb.OFFSET_SCALES}
    allowed = [s for s in emb.OFFSET_SCALES if rep["english_relative_change"][str(s)] <= emb.ENGLISH_TOLERANCE]
    if allowed:  # the chosen scale: lowest Turkish loss among those that keep English
        assert stats.scale == min(allowed, key=lambda s: rep["turkish_nll_per_token"][str(s)])
    # the base rows' split: a_c <= 0, one per base id; d_L separates the Turkish from the English states
    assert stats.base_log_share.shape == (qwen_ext.base_vocab_size,) and (stats.base_log_share <= 0).all()
    assert stats.language_direction.shape == (64,) and stats.base_scale in emb.BASE_SCALES
    tr_fit, en_fit = rep["language_direction_turkish"][0], rep["language_direction_english"][0]
    assert tr_fit > en_fit
    assert set(rep["base_turkish_nll_per_token"]) == set(rep["base_english_relative_change"]) == {str(t) for t in emb.BASE_SCALES}
    stats.save(tmp_path / "s.json")
    again = emb.OffsetStats.load(tmp_path / "s.json")
    assert torch.equal(again.direction, stats.direction) and torch.equal(again.log_continuation, stats.log_continuation)
    assert again.scale == stats.scale and again.report == rep and again.base_scale == stats.base_scale
    assert torch.equal(again.base_log_share, stats.base_log_share)
    assert torch.equal(again.language_direction, stats.language_direction)
    # statistics written before the base rows' split load as "no base correction"
    old = json.loads((tmp_path / "s.json").read_text())
    for k in ("base_log_share", "language_direction", "base_scale"):
        old.pop(k)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert not emb.OffsetStats.load(tmp_path / "old.json").corrects_base_rows


def test_base_log_share_counts_the_boundaries_where_the_base_token_survives(qwen_ext):
    """a_c = log((n_ext(c) + 1/2) / (D(c) + 1)), D(c) = n_ext(c) + the counts of the new tokens that start with c."""
    ext = qwen_ext
    n_ext = torch.zeros(ext.vocab_size, dtype=torch.float64)
    w = ext.new_ids[0]
    c = ext.constituents[w][0]
    family = [i for i in ext.new_ids if ext.constituents[i][0] == c]
    n_ext[c] = 3
    for i in family:
        n_ext[i] = 10
    a = emb.base_log_share(ext, n_ext)
    assert a[c].item() == pytest.approx(float(torch.log(torch.tensor(3.5 / (3 + 10 * len(family) + 1)))), rel=1e-5)
    other = next(i for i in range(ext.base_vocab_size) if i != c)
    assert a[other].item() == pytest.approx(float(torch.log(torch.tensor(0.5))))  # never seen: log(1/2 / 1)


@pytest.fixture(scope="module")
def smol_ext(tmp_path_factory):
    from trkit.vocab import extend_tokenizer

    out = tmp_path_factory.mktemp("smol") / "ext2k"
    extend_tokenizer("smollm2", "default", n_new_tokens=2000, out_dir=out, progress=False)
    return emb.load_extension(out)


@pytest.mark.slow
def test_smollm2_paths_agree(smol_ext, smollm2_dir, tmp_path):
    """Real SmolLM2 weights (tied): checkpoint surgery == in-memory resize, fvt inputs + fvt_offset outputs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    stats = emb.OffsetStats(torch.randn(576) * 0.01, -torch.rand(len(smol_ext.new_ids)) * 6, scale=0.5)
    out = tmp_path / "smol-ext"
    emb.extend_checkpoint(smollm2_dir, smol_ext, out, output_init="fvt_offset", offsets=stats, progress=False)
    model = emb.extend_model(AutoModelForCausalLM.from_pretrained(smollm2_dir), smol_ext, output_init="fvt_offset",
                             offsets=stats, base_tokenizer=smollm2_dir)
    on_disk = _tensors(out)
    assert on_disk["model.embed_tokens.weight"].shape == (smol_ext.rows(49152), 576) == (51200, 576)
    state = model.state_dict()
    for k, v in on_disk.items():
        assert torch.equal(v, state[k]), k
    assert not torch.equal(on_disk["lm_head.weight"], on_disk["model.embed_tokens.weight"])  # untied


def test_embed_cli(qwen_ext, tiny_qwen3_dir, tmp_path, capsys):
    from trkit import assets
    from trkit.cli import main

    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:30]), encoding="utf-8")
    en = tmp_path / "en.txt"
    en.write_text("The quick brown fox jumps over the lazy dog.\nAssertions are a way to debug.\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["embed", "--model", str(tiny_qwen3_dir), "--tokenizer", str(qwen_ext.directory), "--out", str(out),
               "--calibration", str(cal), "--english", str(en), "--dtype", "float32", "--quiet"])
    assert rc == 0 and "output fvt_offset" in capsys.readouterr().out
    stats = emb.OffsetStats.load(out / emb.OFFSET_STATS_NAME)
    assert stats.scale in emb.OFFSET_SCALES
    # reuse the statistics: same tensors without a calibration pass
    rc = main(["embed", "--model", str(tiny_qwen3_dir), "--tokenizer", str(qwen_ext.directory), "--out",
               str(tmp_path / "out2"), "--offset-stats", str(out / emb.OFFSET_STATS_NAME), "--quiet"])
    assert rc == 0
    a, b = _tensors(out), _tensors(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["embed", "--model", str(tiny_qwen3_dir), "--tokenizer", str(tmp_path), "--out",
                 str(tmp_path / "o3"), "--quiet"]) == 2  # not a vocab dir: clean error


def test_save_dtype_halves_the_checkpoint(qwen_ext, tiny_qwen3_dir, tmp_path):
    """Issue 15 item 3: the demo's checkpoints can be written in bf16 (the same values, rounded)."""
    a = emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, tmp_path / "fp32", init="fvt", output_init="first", progress=False)
    b = emb.extend_checkpoint(tiny_qwen3_dir, qwen_ext, tmp_path / "bf16", init="fvt", output_init="first",
                              progress=False, dtype="bfloat16")
    ta, tb = _tensors(tmp_path / "fp32"), _tensors(tmp_path / "bf16")
    assert set(ta) == set(tb) and all(v.dtype == torch.bfloat16 for v in tb.values())
    assert all(torch.equal(ta[k].to(torch.bfloat16), tb[k]) for k in ta)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "bf16") < 0.51 * size(tmp_path / "fp32")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16" and b["dtype"] == "bfloat16"
