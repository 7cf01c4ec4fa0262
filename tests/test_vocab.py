"""Continued BPE with appended merges: ids, loading, guarantees (hypothesis), bad input, reference check."""

from __future__ import annotations

import collections
import json
import math
import re
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
def qwen3_base(qwen3_tokenizer_dir):
    return vocab.load_base(qwen3_tokenizer_dir)


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


def test_more_tokens_than_pairs_fails_unless_allowed(tmp_path, qwen3_tokenizer_dir):
    text = ["Kitaplarımızdan kitaplarımızdan evlerimizde evlerimizde"]
    with pytest.raises(ValueError, match="only .* new tokens could be made .*allow_fewer"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, text, 1000, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = vocab.extend_tokenizer(qwen3_tokenizer_dir, text, 1000, tmp_path / "few", allow_fewer=True,
                                     progress=False)
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


# ---------------------------------------------------------------------------------- reading (issue 10: items 10, 11)


def test_bom_dropped_and_documents_split_on_newline_only(tmp_path, qwen3_tokenizer_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffBugün eve geldim.\r\nYarın\rokula\x0bgideceğim\u2028sonra\x1cdöneceğim.\n".encode("utf-8"))
    words = vocab.count_words(base, [f], progress=False)
    assert words.documents == [2]  # "\r\n" ends a line; "\r", \x0b, U+2028 and \x1c do not (as `trkit corpus`)
    assert not any("\ufeff" in vocab.byte_level_to_text(w).decode("utf-8") for w in words.counts[0])
    assert "Bug" + "Ã¼" + "n" in words.counts[0]  # the first word is learned without the BOM: 'Bugün'


def test_invalid_lines_are_dropped_and_reported(tmp_path, qwen3_tokenizer_dir):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"\xff\xfe bozuk satir\n" + "\n".join(TURKISH_SENTENCES * 6).encode("utf-8") + b"\n\xc3\x28 yine\n")
    res = vocab.extend_tokenizer(qwen3_tokenizer_dir, [f], 20, tmp_path / "o", progress=False)
    assert res.dropped == {"invalid_utf8": 2}
    assert res.manifest["corpus_dropped"] == {"invalid_utf8": 2}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\n\xc3\x28\n")
    with pytest.raises(ValueError, match="empty .*2 lines dropped: invalid_utf8 2"):
        vocab.extend_tokenizer(qwen3_tokenizer_dir, [bad], 20, tmp_path / "o2", progress=False)


def test_long_line_capped_with_bounded_memory(tmp_path):
    """A 20 MB single line: skipped and reported (old code held and pre-tokenised it whole: 2.5 GB)."""
    import subprocess
    import sys

    big = tmp_path / "one_line.txt"
    with open(big, "w", encoding="utf-8") as f:
        f.write(("Türkiye'nin eğitim sisteminde gelişmeler var. " * 440_000).strip() + "\n")
    small = tmp_path / "small.txt"
    small.write_text("\n".join(TURKISH_SENTENCES * 4) + "\n", encoding="utf-8")
    # VmHWM, not ru_maxrss: Linux carries a forking parent's high-water mark over into the child's ru_maxrss
    script = ("import re, sys; from trkit.cli import main; rc = main(sys.argv[1:]); status = open('/proc/self/status')"
              ".read(); print('maxrss_kb', re.search(r'VmHWM:\\s+(\\d+)', status).group(1)); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", script, "vocab", "--corpus", str(big), str(small), "--new-tokens", "20",
                        "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "dropped 1 input lines (too_long_line 1)" in p.stdout
    peak_mb = int(p.stdout.split("maxrss_kb")[1].split()[0]) / 1024
    assert peak_mb < 1000, peak_mb


def test_progress_bar_shows_counting_in_bytes(tmp_path, qwen3_tokenizer_dir, capsys):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(TURKISH_SENTENCES * 50), encoding="utf-8")
    vocab.count_words(vocab.load_base(qwen3_tokenizer_dir), [f], progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    size = f"{f.stat().st_size / 1000:.1f}k"
    assert re.search(rf"counting words: 100%.*{size}/{size} .*B/s", err), err[-300:]


def test_worker_processes_count_the_same(tmp_path, qwen3_tokenizer_dir, monkeypatch):
    base = vocab.load_base(qwen3_tokenizer_dir)
    monkeypatch.setattr(vocab, "WORKER_BATCH_CHARS", 20_000)  # many batches: the queue fills and drains
    files = []
    for i in range(2):
        f = tmp_path / f"s{i}.txt"
        f.write_text("\n".join(TURKISH_SENTENCES[i:] * 2001), encoding="utf-8")
        files.append(f)
    one = vocab.count_words(base, files, progress=False, workers=1)
    two = vocab.count_words(base, files, progress=False, workers=2)
    assert one.counts == two.counts and one.documents == two.documents
    assert one.corpus_sha256 == two.corpus_sha256


def _fast_ranges_chars():
    text = vocab.FAST_SPLIT_RANGES  # "a-bc-d..." -> (a, b), (c, d), ...
    return [chr(i) for lo, hi in zip(text[0::3], text[2::3]) for i in range(ord(lo), ord(hi) + 1)]


def test_fast_splitter_agrees_with_the_tokenizer_on_every_character_of_its_ranges(qwen3_tokenizer_dir, smollm2_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    findall = vocab.fast_splitter(base.tokenizer_json)
    assert findall is not None and vocab.fast_splitter(vocab.load_base(smollm2_dir).tokenizer_json) is None
    pre, table = base.backend.pre_tokenizer, vocab._byte_level_table()
    chars = _fast_ranges_chars()
    assert len(chars) == 1872 and "ğ" in chars and "İ" in chars and "’" in chars and "₺" in chars
    bad = []
    for c in chars:
        for ctx in (c, f"a{c}b", f" {c}", f"{c} ", c * 3, f"1{c}1", f"{c}\n", f"'{c}", f"{c}'s", f"ab {c} cd",
                    f"\r{c}\n", f"{c}  x", f"İ{c}ş"):
            fast = [p.encode("utf-8").decode("latin-1").translate(table) for p in findall(ctx)]
            if fast != [w for w, _ in pre.pre_tokenize_str(ctx)]:
                bad.append((hex(ord(c)), ctx))
    assert bad == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=60), st.text(alphabet=TURKISH_ALPHABET + " .,'’\n\r\t0123456789İ̇ıI",
                                                         max_size=80)), min_size=1, max_size=6))
def test_fast_counting_equals_the_tokenizer(qwen3_base, docs):
    findall = vocab.fast_splitter(qwen3_base.tokenizer_json)
    norm, pre = qwen3_base.backend.normalizer, qwen3_base.backend.pre_tokenizer
    docs = docs + [unicodedata.normalize("NFD", d) for d in docs]  # documents the normaliser changes
    assert vocab._count_docs(norm, pre, docs, findall, nfc=True) == vocab._count_docs(norm, pre, docs)


# ---------------------------------------------------------------------------------- options and outputs (issue 10)


@pytest.mark.parametrize("option,value", [("--min-frequency", "0"), ("--min-frequency", "-3"), ("--new-tokens", "0"),
                                          ("--balance-exponent", "1.5"), ("--word-exponent", "0"),
                                          ("--morphology-penalty", "0"), ("--table-weight", "0"),
                                          ("--max-line-bytes", "0"), ("--max-table-words", "x")])
def test_cli_numbers_checked_at_parse_time(tmp_path, capsys, option, value):
    from trkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["vocab", "--corpus", "default", "--out", str(tmp_path / "o"), option, value])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_min_frequency_below_one_refused_in_python(qwen3_tokenizer_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    words = vocab.count_words(base, TURKISH_SENTENCES, progress=False)
    with pytest.raises(ValueError, match="min_frequency"):
        vocab.learn_merges(base, words, 10, min_frequency=0, progress=False)


def test_cli_fewer_tokens_fails_unless_allowed(tmp_path, capsys):
    from trkit.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("Kitaplarımızdan kitaplarımızdan evlerimizde evlerimizde\n", encoding="utf-8")
    args = ["vocab", "--corpus", str(corpus), "--new-tokens", "1000", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "--allow-fewer" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(args + ["--out", str(tmp_path / "b"), "--allow-fewer"]) == 0
    out = capsys.readouterr().out
    assert "warning: only" in out and "wrote" in out
    invalid = tmp_path / "invalid.txt"
    invalid.write_bytes(b"\xff\xfe\n\xc3\x28\n")
    assert main(["vocab", "--corpus", str(invalid), "--out", str(tmp_path / "c"), "--quiet", "--allow-fewer"]) == 2
    assert "invalid_utf8 2" in capsys.readouterr().err


def test_overwrite_refuses_foreign_dirs_and_inputs_before_counting(tmp_path, monkeypatch, capsys):
    from trkit.cli import main

    def no_counting(*a, **k):
        raise AssertionError("the --out checks must come before counting")

    monkeypatch.setattr(vocab, "count_words", no_counting)
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    corpus = tmp_path / "data" / "c.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n".join(TURKISH_SENTENCES * 4), encoding="utf-8")
    assert main(["vocab", "--corpus", str(corpus), "--out", str(mine), "--overwrite", "--quiet"]) == 2
    assert "not written by trkit" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert main(["vocab", "--corpus", str(corpus), "--out", str(corpus.parent), "--overwrite", "--quiet"]) == 2
    assert "contains the input" in capsys.readouterr().err and corpus.exists()
    table = tmp_path / "t.tsv"
    table.write_text("kitap\t3\n", encoding="utf-8")
    assert main(["vocab", "--corpus", str(table), "--out", str(table), "--overwrite", "--quiet"]) == 2
    assert table.read_text(encoding="utf-8") == "kitap\t3\n"


# ---------------------------------------------------------------------------------- word-count sources (issue 14)


def _tsv(tmp_path, text: str | bytes, name: str = "t.tsv"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


@pytest.mark.parametrize("content,message", [
    ("ev\t3\nkitap 4\n", r"t.tsv:2: expected 'word<TAB>count'"),
    ("ev\t3\nkitap\t4\tfazla\n", r"t.tsv:2: expected 'word<TAB>count'"),
    ("ev\t3\n\nkitap\t-4\n", r"t.tsv:3: count '-4' of 'kitap' is negative"),
    ("ev\t3.5\n", r"t.tsv:1: count '3.5' of 'ev' is not an integer"),
    ("word\tcount\nev\t3\n", r"t.tsv:1: count 'count' of 'word' is not an integer"),
    ("\t3\n", r"t.tsv:1: empty word"),
    ("", r"t.tsv: the word-count table is empty"),
    ("ev\t0\n", r"t.tsv: the word-count table is empty"),
    (b"ev\t3\n\xffbozuk\t2\n", r"t.tsv:2: not UTF-8"),
])
def test_word_count_tsv_bad_input(tmp_path, qwen3_tokenizer_dir, content, message):
    p = _tsv(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        vocab.read_word_counts(p)
    with pytest.raises(ValueError, match=message):  # the same through the whole stage, before anything is written
        vocab.extend_tokenizer(qwen3_tokenizer_dir, [p], 5, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_word_count_tsv_reading(tmp_path):
    p = _tsv(tmp_path, "\ufeffev\t3\r\nkitap\t4\n\nev\t2\nsıfır\t0\n")
    counts, stats = vocab.read_word_counts(p)
    assert counts == {"ev": 5, "kitap": 4}  # BOM and "\r" dropped, duplicates summed, zero counts left out
    assert stats["lines"] == 4 and stats["words"] == 2 and stats["total"] == 9
    top, _ = vocab.read_word_counts(p, max_words=1)
    assert top == {"ev": 5}


def test_counts_enter_pair_statistics_directly(tmp_path, qwen3_tokenizer_dir):
    """A table alone learns exactly what running text of the same words (each after a space) learns."""
    base = vocab.load_base(qwen3_tokenizer_dir)
    table = {"evlerimizde": 7, "kitaplarımızdan": 5, "öğretmenlerimiz": 3, "gelecekmişsiniz": 2}
    p = _tsv(tmp_path, "".join(f"{w}\t{n}\n" for w, n in table.items()))
    from_table = vocab.count_words(base, [p], progress=False)
    from_text = vocab.count_words(base, [" " + w for w, n in table.items() for _ in range(n)], progress=False)
    assert from_table.kinds == ["word counts"] and from_table.sources == ["t"]
    assert dict(from_table.counts[0]) == dict(from_text.counts[0])
    a = vocab.learn_merges(base, from_table, 12, progress=False)
    b = vocab.learn_merges(base, from_text, 12, progress=False)
    assert a.merges == b.merges and len(a.merges) >= 8


def test_table_is_its_own_source_rescaled_to_the_text(tmp_path, qwen3_tokenizer_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    p = _tsv(tmp_path, "evlerimizde\t7000\nkitaplarımızdan\t5000\n", "freq.tsv")
    words = vocab.count_words(base, {"a": TURKISH_SENTENCES * 3, "b": TURKISH_SENTENCES[:2], "f": p}, progress=False)
    assert words.sources == ["a", "b", "f"] and words.kinds == ["text", "text", "word counts"]
    factors = vocab.source_factors(words, table_weight=2.0)
    totals = [sum(c.values()) for c in words.counts]
    assert factors[:2] == [1.0, 1.0]
    assert factors[2] * totals[2] == pytest.approx(2.0 * (totals[0] + totals[1]) / 2)


def test_table_casing_from_text(tmp_path, qwen3_tokenizer_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    p = _tsv(tmp_path, "istanbul\t100\nkitap\t100\n")
    text = collections.Counter({"Ġ" + "Ä°stanbul": 50, "Ġkitap": 50, "ĠKitap": 0})  # ' İstanbul' always capitalised
    lower, _ = vocab.table_word_counts(base, p, text, casing="lower")
    assert lower == {"Ġistanbul": 100, "Ġkitap": 100}
    cased, stats = vocab.table_word_counts(base, p, text, casing="text")
    assert stats["capitalised_share_prior"] == 0.5
    assert cased["Ġ" + "Ä°stanbul"] == pytest.approx(100 * (50 + 4 * 0.5) / (50 + 4))  # Turkish İ, not I
    assert cased["ĠKitap"] == pytest.approx(100 * (0 + 4 * 0.5) / (50 + 4))
    assert sum(cased.values()) == pytest.approx(200)


def test_offline_tables(tmp_path):
    from trkit import assets
    from trkit.artifacts import read_manifest

    for name, words in (("wordfreq", 63_120), ("trnlp", 1_670_501)):
        path = assets.word_table_file(name)
        m = read_manifest(path.parent)
        assert m["words"] == words and m["source"] == assets.PACKAGES[name].spec
        counts, stats = vocab.read_word_counts(path, max_words=1000)
        assert {"ve", "bir", "bu"} <= set(counts) and stats["distinct_words"] == words
    assert all(not any(c.isdigit() for c in w) for w in vocab.read_word_counts(assets.wordfreq_tr_file())[0])
    assert vocab.corpus_sources("trnlp")["trnlp"] == vocab.WordCountTable(assets.trnlp_freq_file(), "trnlp")
    default = vocab.corpus_sources("default")
    assert set(default) == set(assets.corpus_files()) | set(vocab.DEFAULT_CORPUS_TABLES)
    assert set(vocab.corpus_sources("default-text")) == set(assets.corpus_files())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("obj,message", [
    ([("ev", 3)], "holds a list, expected a dict"),
    ({5: 3}, "key 5 is a int, expected str"),
    ({"ev": 3.0}, "the count of 'ev' is a float, expected int"),
    ({"ev": True}, "the count of 'ev' is a bool, expected int"),
    ({"ev": -1}, "negative"),
    ({}, "empty"),
    ({"ev": [1]}, "is a list, expected int"),
])
def test_pickled_table_must_be_str_to_int(obj, message):
    import pickle

    from trkit.assets import AssetError, read_pickled_word_counts

    with pytest.raises(AssetError, match=message):
        read_pickled_word_counts(pickle.dumps(obj), "t.pbz2")


def test_pickled_table_never_runs_code(tmp_path):
    import pickle

    from trkit.assets import AssetError, read_pickled_word_counts

    target = tmp_path / "created_by_pickle"
    data = pickle.dumps({"ev": 3, "kötü": _Evil(str(target))})
    assert pickle.loads(data) and target.exists()  # what plain pickle would do
    target.rmdir()
    with pytest.raises(AssetError, match="refusing .* global posix.mkdir"):
        read_pickled_word_counts(data, "evil.pbz2")
    assert not target.exists()
    with pytest.raises(AssetError, match="refusing"):
        read_pickled_word_counts(b"\x80\x04\x95 truncated", "broken.pbz2")
    assert read_pickled_word_counts(pickle.dumps({"ev": 3, "kitap": 0})) == {"ev": 3, "kitap": 0}


# ---------------------------------------------------------------------------------- candidates (issue 14)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    from trkit.assets import corpus_files

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(input=str(corpus_files()["web"]), model_prefix=str(d / "tr"), vocab_size=1500,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    return d / "tr.model"


@pytest.fixture(scope="module")
def cand_ext(tmp_path_factory, sp_model, qwen3_tokenizer_dir):
    from trkit.assets import corpus_files

    out = tmp_path_factory.mktemp("cand") / "ext"
    return vocab.extend_tokenizer(qwen3_tokenizer_dir, {"web": corpus_files()["web"]}, 400, out, candidates=sp_model,
                                  progress=False)


@pytest.fixture(scope="module")
def cand_backends(cand_ext, qwen3_tokenizer_dir):
    from tokenizers import Tokenizer

    return (Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json")),
            Tokenizer.from_file(str(cand_ext.out_dir / "tokenizer.json")))


def test_read_candidates_formats(tmp_path, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pieces = vocab.read_candidates(sp_model)
    assert "<unk>" not in pieces and "<s>" not in pieces and len(pieces) == sp.get_piece_size() - 3
    assert all("\u2581" not in p for p in pieces) and any(p.startswith(" ") for p in pieces)
    vf = tmp_path / "tr.vocab"
    vf.write_text("<unk>\t0\n\u2581kitap\t-3.5\nlar\t-4.1\n", encoding="utf-8")
    assert vocab.read_candidates(vf) == ["<unk>", " kitap", "lar"]
    lst = tmp_path / "tokens.txt"
    lst.write_text(" kitap\nlar\n\n kitap\n", encoding="utf-8")
    assert vocab.read_candidates(lst) == [" kitap", "lar"]
    bad = tmp_path / "bad.vocab"
    bad.write_text("kitap -3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.vocab:1: expected 'piece<TAB>score'"):
        vocab.read_candidates(bad)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        vocab.read_candidates(junk)


def test_candidates_become_reachable_appended_tokens(cand_ext, cand_backends):
    base, ext = cand_backends
    assert cand_ext.n_new_tokens == 400
    bv, ev = base.get_vocab(with_added_tokens=True), ext.get_vocab(with_added_tokens=True)
    assert all(ev[t] == i for t, i in bv.items())
    assert sorted(i for t, i in ev.items() if t not in bv) == list(range(151_669, 151_669 + 400))
    for t in cand_ext.new_tokens:
        assert [x.id for x in ext.model.tokenize(t["token"])] == [t["id"]], t
    info = cand_ext.manifest["learned"]["candidates"]
    assert info["used"] + info.get("intermediate_tokens", 0) == 400
    assert info["already_in_vocabulary"] > 0 and info["crosses_pretokenizer"] >= 0
    assert cand_ext.manifest["parameters"]["candidates"]["file"] == "tr.model"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80), st.text(alphabet=TURKISH_ALPHABET + " .,'’\n0123456789", max_size=160)))
def test_candidates_roundtrip_and_coarsening(cand_backends, text):
    base, ext = cand_backends
    eb, ee = base.encode(text, add_special_tokens=False), ext.encode(text, add_special_tokens=False)
    assert ext.decode(ee.ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert _bounds(ee.tokens) <= _bounds(eb.tokens)


def test_candidates_ranked_by_corpus_frequency(tmp_path, qwen3_tokenizer_dir):
    base = vocab.load_base(qwen3_tokenizer_dir)
    words = vocab.count_words(base, [" kitaplarımızdan"] * 2 + [" evlerimizde"] * 9 + [" okullarımızdan"] * 5,
                              progress=False)
    cands = [" kitaplarımızdan", " okullarımızdan", " evlerimizde", " hiç görülmemiş", "'da", " yokluklarımızdaki"]
    learned = vocab.candidate_merges(base, words, cands, 50, progress=False)
    texts = [vocab.byte_level_to_text(s).decode("utf-8", errors="replace") for s in learned.strings]
    finals = [t for t in texts if t in cands]
    assert finals == [" evlerimizde", " okullarımızdan", " kitaplarımızdan"]  # by frequency: 9, 5, 2
    assert learned.candidates["crosses_pretokenizer"] == 2  # ' hiç görülmemiş' and "'da" (Qwen splits "'d"+"a")
    assert learned.candidates["below_min_frequency"] == 1  # ' yokluklarımızdaki' never occurs
    ext = json.loads(json.dumps(vocab.extended_tokenizer_json(base, learned)))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(ext))
    for word in (" evlerimizde", " okullarımızdan", " kitaplarımızdan"):
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1


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


def test_jsonl_documents_and_their_drops_are_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "Yarın sabah toplantı var."}, ensure_ascii=False) + "\n\n{not json\n"
                    + json.dumps({"text": 3}) + "\n" + json.dumps(["a"]) + "\n" + json.dumps({"text": "  "}) + "\n",
                    encoding="utf-8")
    dropped = collections.Counter()
    assert list(vocab._iter_file_docs(path, dropped=dropped)) == ["Yarın sabah toplantı var."]
    assert dropped == {"bad_json": 1, "not_text": 2}
