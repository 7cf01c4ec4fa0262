"""Corpus preparation: bad bytes never crash, each filter counts its drops, dedup, split, contamination."""

from __future__ import annotations

import json

import pytest

from trkit import corpus, turkish
from trkit.corpus import CorpusConfig


@pytest.fixture(scope="module")
def good_lines():
    from trkit.assets import validation_files

    lines = validation_files()["kenet"].read_text(encoding="utf-8").splitlines()
    return [line for line in lines if len(line) >= 40][:150]


def _write_inputs(tmp_path, good_lines):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(good_lines) + "\n", encoding="utf-8")
    long_tr = ("Bu sabah erkenden kalkıp pazara gittik, taze sebze ve meyve aldık, sonra eve dönüp "
               "annemle birlikte güzel bir kahvaltı hazırladık ve bütün aile sofraya oturduk.")
    bad = tmp_path / "bad.txt"
    with open(bad, "wb") as f:
        f.write(b"Bu satirda bozuk bayt var \xff\xfe ve devam ediyor uzun uzun\n")  # invalid UTF-8
        f.write("Bu satırda NUL \x00 karakteri bulunuyor, atılmalı.\n".encode())
        f.write(b"x" * 5000 + b"\n")  # enormous line (max_line_bytes=1000 below)
        f.write(b"This is plainly an English sentence and it should be filtered out.\n")
        f.write("Kısa.\n".encode())
        f.write("TÃ¼rkiye'nin eÄŸitim sisteminde Ã¶nemli geliÅŸmeler yaÅŸanÄ±yor bugÃ¼nlerde.\n".encode())
        f.write((turkish.upper(good_lines[0]) + "\n").encode())  # exact duplicate after Turkish casefolding
        f.write((long_tr + "\n").encode())
        f.write((long_tr.replace("taze", "bol") + "\n").encode())  # near duplicate
        f.write("<div>### $$$ @@@ {{}} ||| ~~~ ^^^ <<< >>> === ### $$$ @@@</div>\n".encode())
        f.write("Zil sesi \x07 duyuldu ve herkes sınıfa koştu hemen.\n".encode())
    (tmp_path / "empty.txt").write_bytes(b"")
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "Yarın sabah toplantı saat dokuzda başlayacak, lütfen geç kalmayın."},
                             ensure_ascii=False) + "\n{not json\n" + json.dumps({"other": 1}) + "\n", encoding="utf-8")
    return [good, bad, tmp_path / "empty.txt", jl]


def test_pipeline_counts_every_drop_reason(tmp_path, good_lines):
    from datasets import load_from_disk

    from trkit.artifacts import read_manifest

    inputs = _write_inputs(tmp_path, good_lines)
    cfg = CorpusConfig(max_line_bytes=1000)
    rep = corpus.prepare_corpus(inputs, tmp_path / "out", config=cfg, progress=False)
    d = rep.dropped
    for reason in ("invalid_utf8", "nul_bytes", "too_long_line", "not_turkish", "too_short", "exact_duplicate",
                   "near_duplicate", "junk", "control_chars", "empty_file", "bad_json", "not_text"):
        assert d.get(reason, 0) >= 1, (reason, d)
    ds = load_from_disk(str(tmp_path / "out"))
    assert set(ds) == {"train", "validation", "test"}
    assert sum(len(ds[s]) for s in ds) == sum(rep.kept.values()) >= 140
    texts = [t for s in ds for t in ds[s]["text"]]
    assert any("Türkiye'nin eğitim sisteminde önemli gelişmeler" in t for t in texts)  # mojibake repaired
    assert not any("English" in t for t in texts)
    assert set(ds["train"]["source"]) <= {"good", "bad", "docs"}
    m = read_manifest(tmp_path / "out")
    assert m["stage"] == "corpus" and m["kept"] == rep.kept and m["dropped"] == dict(sorted(d.items()))
    assert len(m["inputs"]) == 4 and all(len(h) == 64 for h in m["inputs"].values())
    assert m["per_source"]["bad"]["dropped_nul_bytes"] == 1
    assert rep.table()[0]["what"] == "kept: train"


def test_split_is_deterministic_and_by_hash(tmp_path, good_lines):
    from datasets import load_from_disk

    inputs = [tmp_path / "g.txt"]
    inputs[0].write_text("\n".join(good_lines), encoding="utf-8")
    cfg = CorpusConfig(validation_percent=20, test_percent=20)
    corpus.prepare_corpus(inputs, tmp_path / "a", config=cfg, progress=False)
    inputs[0].write_text("\n".join(reversed(good_lines)), encoding="utf-8")  # order does not matter
    corpus.prepare_corpus(inputs, tmp_path / "b", config=cfg, progress=False)
    a, b = load_from_disk(str(tmp_path / "a")), load_from_disk(str(tmp_path / "b"))
    for s in ("train", "validation", "test"):
        assert sorted(a[s]["id"]) == sorted(b[s]["id"])
        assert all(corpus.split_of(t, cfg) == s for t in a[s]["text"])
    assert len(a["validation"]) > 10 and len(a["test"]) > 10


def test_contaminated_validation_documents_are_removed(tmp_path):
    cfg = CorpusConfig(validation_percent=10, test_percent=0, contamination_ngram=8)
    shared = "kırmızı elbiseli kadın dün akşam tiyatroda harika bir oyun sergiledi"
    train_doc = f"Geçen hafta {shared} ve salondaki herkes ayakta alkışladı, biz de çok beğendik."
    assert corpus.split_of(corpus.clean(train_doc, cfg), cfg) == "train"
    for k in range(2000):
        val_doc = (f"Gazetede okuduğuma göre {shared}; eleştirmenler bu yorumu {k}. kez övdü, "
                   "yönetmen ise yeni projesini anlattı ve seyircilere teşekkür etti.")
        if corpus.split_of(corpus.clean(val_doc, cfg), cfg) == "validation":
            break
    else:
        pytest.fail("no validation variant found")
    f = tmp_path / "c.txt"
    f.write_text(train_doc + "\n" + val_doc + "\n", encoding="utf-8")
    rep = corpus.prepare_corpus([f], tmp_path / "out", config=cfg, progress=False)
    assert rep.dropped.get("contaminated") == 1
    assert rep.kept == {"train": 1, "validation": 0, "test": 0}


def test_refusals(tmp_path):
    f = tmp_path / "en.txt"
    f.write_text("Only English text lives in this file, nothing Turkish at all.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no document survived"):
        corpus.prepare_corpus([f], tmp_path / "o", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        corpus.prepare_corpus([f], tmp_path / "exists", progress=False)
    with pytest.raises(FileNotFoundError):
        corpus.prepare_corpus([tmp_path / "missing.txt"], tmp_path / "o2", progress=False)
    with pytest.raises(ValueError):
        CorpusConfig(validation_percent=60, test_percent=50)


def test_filters_unit():
    cfg = CorpusConfig()
    assert corpus.clean("  Türkiye\u2003 ve\n\n dünya  ", cfg) == "Türkiye ve dünya"
    assert corpus.reject_reason("", "", cfg) == "empty"
    ok = "Bu kitap çok güzel ve öğretici, herkese tavsiye ederim."
    assert corpus.reject_reason(ok, ok, cfg) is None
    assert corpus.junk_ratio("abc {}{}{}{}") > 0.4
    assert corpus.doc_hash("İSTANBUL güzel") == corpus.doc_hash("istanbul GÜZEL")


def test_corpus_dir_feeds_vocab(tmp_path, good_lines):
    from trkit import vocab

    f = tmp_path / "g.txt"
    f.write_text("\n".join(good_lines), encoding="utf-8")
    corpus.prepare_corpus([f], tmp_path / "c", progress=False)
    src = vocab.corpus_sources(tmp_path / "c")
    assert list(src) == ["g"] and len(src["g"]) > 100
    texts = corpus.split_files(tmp_path / "c", "train")
    assert list(texts) == ["g"]


def test_cli(tmp_path, good_lines, capsys):
    from trkit.cli import main

    f = tmp_path / "g.txt"
    f.write_text("\n".join(good_lines[:50]), encoding="utf-8")
    assert main(["corpus", "--input", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "kept: train" in capsys.readouterr().out
    assert main(["corpus", "--input", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_empty_splits_are_written_loadable_and_legacy_ones_still_load(tmp_path, good_lines):
    """An empty split is saved as one empty shard; a directory from before (no data file) loads too."""
    from datasets import Dataset, DatasetDict, load_from_disk

    from trkit.artifacts import write_manifest

    f = tmp_path / "g.txt"
    f.write_text("\n".join(good_lines[:30]), encoding="utf-8")
    rep = corpus.prepare_corpus([f], tmp_path / "c", config=CorpusConfig(validation_percent=0, test_percent=0),
                                progress=False)
    assert rep.kept["validation"] == rep.kept["test"] == 0
    assert len(load_from_disk(str(tmp_path / "c"))["test"]) == 0
    assert corpus.split_files(tmp_path / "c", "validation") == {}

    legacy = tmp_path / "legacy"  # what the old code wrote: save_to_disk of a 0-row split, no data file
    features = corpus._features()
    DatasetDict({"train": Dataset.from_dict({"text": ["bir"], "source": ["s"], "id": ["0"]}, features=features),
                 "validation": Dataset.from_dict({k: [] for k in corpus.FEATURES}, features=features),
                 "test": Dataset.from_dict({k: [] for k in corpus.FEATURES}, features=features)}).save_to_disk(str(legacy))
    write_manifest(legacy, "corpus", kept={"train": 1, "validation": 0, "test": 0})
    with pytest.raises(IndexError):
        load_from_disk(str(legacy))
    dd = corpus.load_corpus(legacy)
    assert len(dd["train"]) == 1 and len(dd["test"]) == 0
    with pytest.raises(ValueError, match="not `trkit corpus`"):
        write_manifest(tmp_path / "c", "vocab")
        corpus.load_corpus(tmp_path / "c")


def test_read_documents_is_strict_and_splits_on_newline_only(tmp_path):
    import gzip

    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffbir\u2028iki\x0büç\r\n\n  \ndört\x85beş\n".encode("utf-8"))
    assert corpus.read_documents(p) == ["bir\u2028iki\x0büç", "dört\x85beş"]
    assert corpus.read_documents(p, unit="file") == ["bir\u2028iki\x0büç\r\n\n  \ndört\x85beş\n"]
    import bz2
    import lzma

    for name, compress in (("t.txt.gz", gzip.compress), ("t.bz2", bz2.compress), ("t.xz", lzma.compress)):
        packed = tmp_path / name
        packed.write_bytes(compress(p.read_bytes()))
        assert corpus.read_documents(packed) == corpus.read_documents(p), name
        (tmp_path / f"cut-{name}").write_bytes(packed.read_bytes()[:-12])
        with pytest.raises(ValueError, match=f"cut-{name} could not be read to the end"):
            corpus.read_documents(tmp_path / f"cut-{name}")
    (tmp_path / "bzh.txt").write_text("BZh9 diye başlayan düz bir metin\n", encoding="utf-8")
    assert corpus.read_documents(tmp_path / "bzh.txt") == ["BZh9 diye başlayan düz bir metin"]
    (tmp_path / "bad.txt").write_bytes(b"ok\nbozuk \xc3 bayt\n")
    with pytest.raises(ValueError, match=r"bad.txt line 2 is not valid UTF-8 \(byte 0xc3 at column 6\)"):
        corpus.read_documents(tmp_path / "bad.txt")
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        corpus.read_documents(tmp_path / "blank.txt")
    with pytest.raises(IsADirectoryError):
        corpus.read_documents(tmp_path)


def test_long_documents_are_measured_in_pieces(tmp_path):
    words = [f"kelime{i}" for i in range(3000)]
    text = " ".join(words)
    pieces = corpus.split_long_text(text, 1000)
    assert "".join(pieces) == text and all(len(x) <= 1000 for x in pieces) and len(pieces) > 20
    assert all(x.endswith(" ") for x in pieces[:-1])  # cut after whitespace, never inside a word
    assert corpus.split_long_text("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]
    p = tmp_path / "long.txt"
    p.write_text("kısa satır\n" + text + "\n", encoding="utf-8")
    notes: list[str] = []
    docs = corpus.read_documents(p, max_chars=1000, notes=notes)
    assert docs[0] == "kısa satır" and "".join(docs[1:]) == text
    assert len(notes) == 1 and "line 2" in notes[0] and f"measured as {len(pieces)} consecutive pieces" in notes[0]


def test_text_sources_name_where_texts_come_from(tmp_path, good_lines):
    import zipfile

    from trkit import assets

    srcs = corpus.text_sources(["validation", "english"])  # english is already part of 'validation': once
    assert [s.name for s in srcs] == [f"tr-{k}" for k in assets.validation_files()] + ["english"]
    assert all(s.language == "Turkish" for s in srcs[:-1]) and srcs[-1].language == "English"
    assert "held-out validation split" in srcs[0].origin and "not a split that `trkit corpus` wrote" in srcs[0].note
    described = corpus.describe_sources(srcs)
    assert described.count("note:") == 1 and str(assets.english_file()) in described
    f = tmp_path / "g.txt"
    f.write_text("\n".join(good_lines[:80]), encoding="utf-8")
    corpus.prepare_corpus([f], tmp_path / "c", config=CorpusConfig(validation_percent=20, test_percent=0),
                          progress=False)
    (s,) = corpus.text_sources([tmp_path / "c"])
    assert s.name == "tr-g" and s.language == "Turkish" and len(s.read()) == len(corpus.split_files(tmp_path / "c")["g"])
    with pytest.raises(ValueError, match="'test' split is empty"):
        corpus.text_sources([tmp_path / "c"], split="test")
    (g2,) = corpus.text_sources([f])
    assert g2.name == "g" and g2.language == "" and g2.read() and g2.language == "Turkish"
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("a.txt", "bir")
    with pytest.raises(ValueError, match="zip archive"):
        corpus.text_sources([tmp_path / "a.zip"])
    with pytest.raises(FileNotFoundError, match="no such file or corpus directory"):
        corpus.text_sources([tmp_path / "missing.txt"])
    assert corpus.text_language(["The value of the attribute is returned by the function."]) == "English"
    assert corpus.text_language(["12345 67890"]) == "other"
