"""Continued BPE with appended merges: ids, loading, guarantees (hypothesis), bad input, reference check."""

from __future__ import annotations

import collections
import json
import math
import unicodedata
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trkit import vocab

TURKISH_ALPHABET = "abcçdefgğhıijklmnoöprsştuüvyzâîûABCÇDEFGĞHIİJKLMNOÖPRSŞTUÜVYZ"
TURKISH_SENTENCES = [
    "Geliyorum eve, yarın görüşürüz.",
    "Öğrenciler için hazırlanmış materyaller.",
    "Türkiye'nin eğitim sisteminde gelişmeler.",
    "İstanbul'da ılık bir akşam; Iğdır'dan ağabeyim geldi.",
    "Kitaplarımızdan birini okuyabilir misiniz?",
]


@pytest.fixture(scope="module")
def qwen_ext(tmp_path_factory, qwen3_tokenizer_dir):
    out = tmp_path_factory.mktemp("vocab") / "qwen3-tr"
    return vocab.extend_tokenizer(qwen3_tokenizer_dir, "default", 3000, out, progress=False)


@pytest.fixture(scope="module")
def backends(qwen_ext, qwen3_tokenizer_dir):
    from tokenizers import Tokenizer

    return (Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json")),
            Tokenizer.from_file(str(qwen_ext.out_dir / "tokenizer.json")))


@pytest.fixture(scope="module")
def ext_auto(qwen_ext):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_ext.out_dir)


def _bounds(tokens: list[str]) -> set[int]:
    out, pos = set(), 0
    for t in tokens[:-1]:
        pos += len(t)
        out.add(pos)
    return out


# ---------------------------------------------------------------------------------- ids and loading


def test_ids_kept_and_new_ids_appended(qwen_ext, backends, qwen3_tokenizer):
    base, ext = backends
    assert qwen_ext.base_vocab_size == len(qwen3_tokenizer) == 151_669
    assert qwen_ext.n_new_tokens == 3000
    bv, ev = base.get_vocab(with_added_tokens=True), ext.get_vocab(with_added_tokens=True)
    assert all(ev[t] == i for t, i in bv.items())
    new_ids = sorted(i for t, i in ev.items() if t not in bv)
    assert new_ids == list(range(151_669, 151_669 + 3000))


def test_autotokenizer_loads_with_special_ids_unchanged(ext_auto, qwen3_tokenizer):
    assert len(ext_auto) == len(qwen3_tokenizer) + 3000
    for tok in qwen3_tokenizer.all_special_tokens + ["<think>", "</think>", "<tool_call>"]:
        assert ext_auto.convert_tokens_to_ids(tok) == qwen3_tokenizer.convert_tokens_to_ids(tok)
        assert ext_auto.encode(tok, add_special_tokens=False) == [qwen3_tokenizer.convert_tokens_to_ids(tok)]
    assert ext_auto.convert_tokens_to_ids("<|im_end|>") == 151_645


def test_added_tokens_pinned_in_bpe_vocab(qwen_ext):
    tj = json.loads((qwen_ext.out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    v = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        assert v[t["content"]] == t["id"]
    assert tj["model"]["ignore_merges"] is False


def test_chat_template_unchanged(ext_auto, qwen3_tokenizer):
    msgs = [{"role": "system", "content": "Sen yardımcı bir asistansın."},
            {"role": "user", "content": "Merhaba, nasılsın?"}, {"role": "assistant", "content": "İyiyim, teşekkürler."}]
    assert ext_auto.chat_template == qwen3_tokenizer.chat_template
    a = ext_auto.apply_chat_template(msgs, tokenize=False)
    b = qwen3_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert a == b
    ids = ext_auto.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert ids.count(151_644) == 3 and ids.count(151_645) == 3


def test_autotokenizer_matches_backend_and_learned_segmentation(ext_auto, backends):
    _, ext = backends
    for s in TURKISH_SENTENCES:
        assert ext_auto.encode(s, add_special_tokens=False) == ext.encode(s, add_special_tokens=False).ids
        assert ext_auto.decode(ext_auto.encode(s, add_special_tokens=False)) == s
    # the extension actually shortens Turkish
    n_base = sum(len(backends[0].encode(s).ids) for s in TURKISH_SENTENCES)
    n_ext = sum(len(ext.encode(s).ids) for s in TURKISH_SENTENCES)
    assert n_ext < 0.85 * n_base


# ---------------------------------------------------------------------------------- manifest


def test_manifest_fields(qwen_ext, qwen3_tokenizer_dir):
    from trkit.artifacts import read_manifest, sha256_file

    m = read_manifest(qwen_ext.out_dir)  # verifies file hashes
    assert m["stage"] == "vocab"
    assert m["base_tokenizer_sha256"] == sha256_file(qwen3_tokenizer_dir / "tokenizer.json")
    assert m["base_fingerprint"] == vocab.tokenizer_fingerprint(qwen3_tokenizer_dir)
    assert m["base_vocab_size"] == 151_669
    assert len(m["corpus_sha256"]) == 64
    assert m["parameters"]["n_new_tokens"] == 3000
    assert len(m["new_tokens"]) == 3000
    t0 = m["new_tokens"][0]
    assert set(t0) == {"id", "token", "left", "right"} and t0["id"] == 151_669
    assert all(t["left"] + t["right"] == t["token"] for t in m["new_tokens"])


def test_fingerprint_stable_across_resave_and_sensitive(tmp_path, qwen3_tokenizer, qwen3_tokenizer_dir, qwen_ext):
    qwen3_tokenizer.save_pretrained(tmp_path / "resaved")
    fp = vocab.tokenizer_fingerprint(qwen3_tokenizer_dir)
    assert vocab.tokenizer_fingerprint(tmp_path / "resaved") == fp
    assert vocab.tokenizer_fingerprint(qwen3_tokenizer_dir / "tokenizer.json") == fp
    assert vocab.tokenizer_fingerprint(qwen_ext.out_dir) != fp
    tj = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["merges"] = tj["model"]["merges"][:-1]
    assert vocab.tokenizer_fingerprint(tj) != fp


def test_new_token_constituents(qwen_ext, backends):
    base, ext = backends
    cons = vocab.new_token_constituents(qwen_ext.out_dir)
    assert sorted(cons) == list(range(151_669, 151_669 + 3000))
    for new_id, parts in list(cons.items())[::37]:
        assert len(parts) >= 2 and all(p < 151_643 for p in parts)
        assert "".join(base.id_to_token(p) for p in parts) == ext.id_to_token(new_id)


# ---------------------------------------------------------------------------------- guarantees


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=120), st.text(alphabet=TURKISH_ALPHABET + " .,'’\n0123456789", max_size=200)))
def test_roundtrip_and_coarsening(backends, text):
    base, ext = backends
    eb, ee = base.encode(text, add_special_tokens=False), ext.encode(text, add_special_tokens=False)
    assert ext.decode(ee.ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert _bounds(ee.tokens) <= _bounds(eb.tokens)
    assert len(ee.ids) <= len(eb.ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TURKISH_SENTENCES + ["ve", "bir", "çok", "değil", "\n", "2024'te", "(", ")"]),
                min_size=1, max_size=12))
def test_roundtrip_turkish_sentences(backends, parts):
    base, ext = backends
    text = " ".join(parts)
    ee = ext.encode(text, add_special_tokens=False)
    assert ext.decode(ee.ids) == text
    assert _bounds(ee.tokens) <= _bounds(base.encode(text, add_special_tokens=False).tokens)


def test_no_unreachable_new_tokens(qwen_ext, backends):
    _, ext = backends
    unreachable = []
    for t in qwen_ext.new_tokens:
        if [x.id for x in ext.model.tokenize(t["token"])] != [t["id"]]:
            unreachable.append(t["token"])
    assert unreachable == []
    # through the whole pipeline too, for tokens that are whole, valid text pre-tokenised as one piece
    checked = 0
    for t in qwen_ext.new_tokens[::10]:
        try:
            text = vocab.byte_level_to_text(t["token"]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(ext.pre_tokenizer.pre_tokenize_str(text)) == 1:
            assert ext.encode(text, add_special_tokens=False).ids == [t["id"]], t
            checked += 1
    assert checked > 100


def test_english_barely_changes(backends):
    from trkit.assets import english_file

    base, ext = backends
    docs = english_file().read_text(encoding="utf-8").splitlines()[:300]
    nb = sum(len(e.ids) for e in base.encode_batch(docs, add_special_tokens=False))
    ne = sum(len(e.ids) for e in ext.encode_batch(docs, add_special_tokens=False))
    assert abs(ne - nb) / nb <= 0.005


def test_special_tokens_single_ids_inside_text(backends):
    _, ext = backends
    ids = ext.encode("<|im_start|>user\nMerhaba<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 151_644 and ids[-1] == 151_645


# ---------------------------------------------------------------------------------- the learner itself


def _naive_greedy_check(base, words, learned, selection, word_exponent, balance_exponent):
    """Recount every pair from scratch at every step and check each chosen pair had the best score."""
    vocab_map = base.backend.get_vocab(with_added_tokens=True)
    id_to_str = {i: s for s, i in vocab_map.items()}
    segs = []  # (ids, source, weight)
    for s, counter in enumerate(words.counts):
        for w, f in counter.items():
            segs.append(([t.id for t in base.backend.model.tokenize(w)], s, f**word_exponent))
    S = len(words.counts)

    def counts_now():
        c = collections.defaultdict(lambda: [0.0] * S)
        for ids, s, f in segs:
            for a, b in zip(ids, ids[1:]):
                c[(a, b)][s] += f
        return c

    init = counts_now()
    totals = [sum(v[s] for v in init.values()) for s in range(S)]
    mean = sum(totals) / S
    scale = [1e5 / mean * (mean / t) ** balance_exponent for t in totals]

    def score(v):
        if selection == "frequency":
            return sum(v)
        return sum(math.log1p(k * x) for k, x in zip(scale, v) if x > 0)

    known = set(vocab_map)
    for j, ((a, b), new_str) in enumerate(zip(learned.merges, learned.strings)):
        c = counts_now()
        eligible = {p: score(v) for p, v in c.items() if sum(v) >= 2**word_exponent - 1e-9 and id_to_str[p[0]] + id_to_str[p[1]] not in known}
        best = max(eligible.values())
        assert eligible[(a, b)] == pytest.approx(best, rel=1e-9, abs=1e-9), j
        new_id = learned.first_new_id + j
        id_to_str[new_id] = new_str
        known.add(new_str)
        for ids, _, _ in segs:
            i = 0
            while i < len(ids) - 1:
                if ids[i] == a and ids[i + 1] == b:
                    ids[i : i + 2] = [new_id]
                i += 1


@pytest.mark.parametrize("selection,word_exponent,balance_exponent",
                         [("frequency", 1.0, 0.5), ("balanced", 0.5, 1.0), ("balanced", 1.0, 0.5)])
def test_incremental_counts_match_naive_recount(qwen3_tokenizer_dir, selection, word_exponent, balance_exponent):
    base = vocab.load_base(qwen3_tokenizer_dir)
    texts = {
        "a": TURKISH_SENTENCES * 3 + ["evlerinde evlerimizde evlerinizden kitaplarımızdan aaa aaaa aaaaa"],
        "b": ["Kitapları masaya koydular, evlerine döndüler.", "Öğretmenler öğrencilerle konuştu."] * 2,
    }
    words = vocab.count_words(base, texts, progress=False)
    learned = vocab.learn_merges(base, words, 40, selection=selection, word_exponent=word_exponent,
                                 balance_exponent=balance_exponent, progress=False)
    assert len(learned.merges) > 10
    _naive_greedy_check(base, words, learned, selection, word_exponent, balance_exponent)


def test_stem_boundaries_are_byte_offsets():
    counts = {"Ġevlerinde": 5, "Ġev": 9, "Ġevler": 4, "ĠkitaplarÄ±mÄ±zdan": 3, "Ġkitap": 7}
    b = vocab.stem_boundaries(counts, counts)
    assert b["Ġevlerinde"] == 3  # " ev|lerinde"
    assert b["ĠkitaplarÄ±mÄ±zdan"] == 6  # " kitap|larımızdan"
    assert "Ġev" not in b


def test_morphology_option_runs_and_is_recorded(tmp_path, qwen3_tokenizer_dir):
    from trkit.assets import validation_files

    res = vocab.extend_tokenizer(qwen3_tokenizer_dir, validation_files()["kenet"], 200, tmp_path / "m",
                                 morphology=True, progress=False)
    assert res.manifest["parameters"]["morphology"] is True
    assert res.n_new_tokens == 200


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, qwen3_tokenizer_dir):
    with pytest.raises(ValueError, match="empty"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, [], 10, tmp_path / "x", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, [empty], 10, tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, [str(tmp_path / "typo.txt")], 10, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, ["ev evler"], 10, tmp_path / "exists", progress=False)
    with pytest.raises(ValueError, match="selection"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, ["ev evler"], 10, selection="magic", progress=False)


def test_more_tokens_than_pairs_warns_and_reports_real_count(tmp_path, qwen3_tokenizer_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = vocab.extend_tokenizer(qwen3_tokenizer_dir, ["Kitaplarımızdan kitaplarımızdan evlerimizde evlerimizde"],
                                     1000, tmp_path / "few", progress=False)
    assert any("only" in str(w.message) for w in caught)
    assert 0 < res.n_new_tokens < 1000
    assert res.manifest["learned"]["stopped_early"] is True
    assert len(res.manifest["new_tokens"]) == res.n_new_tokens


def test_overwrite_replaces(tmp_path, qwen3_tokenizer_dir):
    out = tmp_path / "o"
    vocab.extend_tokenizer(qwen3_tokenizer_dir, ["evlerimizde evlerimizde"] * 3, 2, out, progress=False)
    res = vocab.extend_tokenizer(qwen3_tokenizer_dir, ["kitaplarımızdan kitaplarımızdan"] * 3, 2, out,
                                 overwrite=True, progress=False)
    assert vocab.new_token_constituents(out).keys() == {151_669, 151_670}
    assert res.out_dir == out


def test_unsupported_tokenizer_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "ev": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "wp").mkdir()
    tok.save(str(tmp_path / "wp" / "tokenizer.json"))
    with pytest.raises(ValueError, match="not supported"):
        vocab.extend_tokenizer(tmp_path / "wp", ["ev ev"], 5, progress=False)
    bpe = Tokenizer(models.BPE({"e": 0, "v": 1, "ev": 2}, [("e", "v")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "bpe").mkdir()
    bpe.save(str(tmp_path / "bpe" / "tokenizer.json"))
    with pytest.raises(ValueError, match="ByteLevel"):
        vocab.extend_tokenizer(tmp_path / "bpe", ["ev ev"], 5, progress=False)


def test_tokenizer_object_as_base(tmp_path, qwen3_tokenizer):
    res = vocab.extend_tokenizer(qwen3_tokenizer, ["evlerimizde evlerimizde kitaplarımızdan kitaplarımızdan"] * 2, 3,
                                 tmp_path / "obj", progress=False)
    assert res.base_vocab_size == 151_669 and res.n_new_tokens == 3


# ---------------------------------------------------------------------------------- SmolLM2 (GPT-2 style)


def test_smollm2_extension(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from trkit.assets import validation_files

    res = vocab.extend_tokenizer(smollm2_dir, validation_files()["kenet"], 500, tmp_path / "smol", progress=False)
    base = AutoTokenizer.from_pretrained(smollm2_dir)
    ext = AutoTokenizer.from_pretrained(res.out_dir)
    assert res.base_vocab_size == len(base) == 49_152 and len(ext) == 49_152 + 500
    for tok in base.all_special_tokens:
        assert ext.convert_tokens_to_ids(tok) == base.convert_tokens_to_ids(tok)
    # the digit pre-tokenizer is kept: no new token glues two digits
    assert not any(any(a.isdigit() and b.isdigit() for a, b in zip(t["token"], t["token"][1:])) for t in res.new_tokens)
    for s in TURKISH_SENTENCES + ["Yıl 2024, sayı 12345."]:
        ids = ext.encode(s, add_special_tokens=False)
        assert ext.decode(ids) == s
        assert len(ids) <= len(base.encode(s, add_special_tokens=False))


# ---------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    from trkit.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TURKISH_SENTENCES * 4), encoding="utf-8")
    rc = main(["vocab", "--base", "qwen3", "--corpus", str(corpus), "--new-tokens", "20", "--out",
               str(tmp_path / "cli"), "--quiet"])
    assert rc == 0 and "20 new tokens" in capsys.readouterr().out
    assert main(["vocab", "--corpus", str(corpus), "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["vocab", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y")]) == 2


# ---------------------------------------------------------------------------------- full size (slow)


@pytest.mark.slow
def test_full_20k_qwen3_default_corpus(tmp_path, qwen3_tokenizer_dir):
    from trkit import tokstats
    from trkit.assets import english_file, validation_file

    res = vocab.extend_tokenizer("qwen3", "default", 20_000, tmp_path / "q20k", progress=False)
    assert res.n_new_tokens == 20_000
    rep = tokstats.compare(qwen3_tokenizer_dir, res.out_dir, {"val": validation_file(), "en": english_file()})
    val, en = rep["sources"]["val"], rep["sources"]["en"]
    assert val["pct_fewer"] >= 25.0
    assert abs(en["pct_fewer"]) <= 0.5
    assert val["roundtrip_failures"] == en["roundtrip_failures"] == 0
    assert val["coarsening_violations"] == en["coarsening_violations"] == 0
    assert res.manifest["learned"]["skipped_unreachable"] >= 0
    from tokenizers import Tokenizer

    ext = Tokenizer.from_file(str(res.out_dir / "tokenizer.json"))
    assert all([x.id for x in ext.model.tokenize(t["token"])] == [t["id"]] for t in res.new_tokens)


@pytest.mark.slow
def test_full_20k_smollm2_default_corpus(tmp_path, smollm2_dir):
    from trkit import tokstats
    from trkit.assets import english_file, validation_file

    res = vocab.extend_tokenizer("smollm2", "default", 20_000, tmp_path / "s20k", progress=False)
    assert res.n_new_tokens == 20_000 and res.base_vocab_size == 49_152
    rep = tokstats.compare(smollm2_dir, res.out_dir, {"val": validation_file(), "en": english_file()})
    assert rep["sources"]["val"]["pct_fewer"] >= 35.0
    assert abs(rep["sources"]["en"]["pct_fewer"]) <= 0.5
    assert rep["sources"]["val"]["roundtrip_failures"] == 0 and rep["sources"]["val"]["coarsening_violations"] == 0
