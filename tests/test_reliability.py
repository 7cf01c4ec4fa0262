"""Bad inputs through the real command line: a clear message and exit 2, never a traceback, and nothing
lost or half-written (issue 10). Most cases call ``trkit.cli.main`` in-process (what ``python -m trkit``
runs); signals and a missing dependency need a real ``python -m trkit`` subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from trkit.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m trkit ARGV`` run in-process; argparse errors included."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage error
        rc = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def subprocess_env(tmpdir: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


@pytest.fixture(scope="module")
def turkish_lines():
    from trkit.assets import corpus_files

    lines = corpus_files()["kenet"].read_text(encoding="utf-8").split("\n")
    return [line for line in lines if len(line) >= 40]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, turkish_lines):
    """A small prepared corpus (validation and test splits non-empty)."""
    from trkit.corpus import CorpusConfig, prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    src = root / "kenet.txt"
    src.write_text("\n".join(turkish_lines[:120]) + "\n", encoding="utf-8")
    prepare_corpus([src], root / "c", config=CorpusConfig(validation_percent=20, test_percent=20), progress=False)
    return root / "c"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 1-layer Llama over SmolLM2's tokenizer, saved as safetensors (fast to load and score)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trkit import assets

    tok = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny") / "m"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


def test_corpus_empty_splits_load_as_empty_and_feed_vocab(tmp_path, turkish_lines, capsys):
    """Issue 10 item 2: --test-percent 0 / --validation-percent 0 wrote splits load_from_disk could not read."""
    from datasets import load_from_disk

    from trkit import corpus, vocab

    src = tmp_path / "g.txt"
    src.write_text("\n".join(turkish_lines[:60]) + "\n", encoding="utf-8")
    rc, out, _ = cli(["corpus", "--input", src, "--out", tmp_path / "c", "--quiet",
                      "--validation-percent", 0, "--test-percent", 0], capsys)
    assert rc == 0
    dd = load_from_disk(str(tmp_path / "c"))  # IndexError on the old code
    assert len(dd["validation"]) == 0 and len(dd["test"]) == 0 and len(dd["train"]) > 40
    assert "empty split(s): validation, test" in out
    assert dd["test"].column_names == ["text", "source", "id"]
    assert corpus.split_files(tmp_path / "c", "test") == {}
    assert len(vocab.corpus_sources(tmp_path / "c")["g"]) == len(dd["train"])


@pytest.mark.parametrize("option,value", [
    ("--validation-percent", "-1"), ("--validation-percent", "100"), ("--test-percent", "150"),
    ("--min-chars", "0"), ("--max-chars", "-5"), ("--max-junk-ratio", "2"), ("--min-turkish-score", "-0.1"),
    ("--near-dup-threshold", "0"), ("--contamination-ngram", "0"), ("--limit", "0"), ("--min-chars", "ten"),
])
def test_corpus_numeric_options_are_checked_at_parse_time(tmp_path, option, value, capsys):
    rc, _, err = cli(["corpus", "--input", "default", "--out", tmp_path / "o", option, value], capsys)
    assert rc == 2 and f"argument {option}" in err
    assert not (tmp_path / "o").exists()


def test_corpus_option_combinations_are_checked_before_work(tmp_path, capsys):
    rc, _, err = cli(["corpus", "--input", "default", "--out", tmp_path / "o",
                      "--validation-percent", 60, "--test-percent", 40], capsys)
    assert rc == 2 and "--validation-percent 60 + --test-percent 40" in err
    rc, _, err = cli(["corpus", "--out", tmp_path / "o", "--min-chars", 50, "--max-chars", 10], capsys)
    assert rc == 2 and "--max-chars 10 is below --min-chars 50" in err


def test_corpus_out_never_destroys_an_input_or_a_foreign_directory(tmp_path, turkish_lines, capsys):
    """Issue 10 item 4: `corpus --input DIR/my_corpus.txt --out DIR --overwrite` deleted the input (here DIR
    is even an earlier trkit output, which --overwrite may replace: the input inside it must still win)."""
    text = "\n".join(turkish_lines[:40]) + "\n"
    first = tmp_path / "first.txt"
    first.write_text(text, encoding="utf-8")
    data = tmp_path / "DIR"
    assert cli(["corpus", "--input", first, "--out", data, "--quiet"], capsys)[0] == 0
    src = data / "my_corpus.txt"
    src.write_text(text, encoding="utf-8")
    before = src.read_bytes()
    rc, _, err = cli(["corpus", "--input", src, "--out", data, "--overwrite", "--quiet"], capsys)
    assert src.is_file() and src.read_bytes() == before  # deleted by the old code
    assert rc == 2 and "contains the input" in err

    rc, _, err = cli(["corpus", "--input", src, "--out", data / "my_corpus.txt" / "x", "--quiet"], capsys)
    assert rc == 2 and "lies inside the input" in err and src.read_bytes() == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    rc, _, err = cli(["corpus", "--input", src, "--out", mine, "--overwrite", "--quiet"], capsys)
    assert rc == 2 and "not written by trkit" in err and (mine / "notes.txt").read_text() == "keep me"

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, _, err = cli(["corpus", "--input", src, "--out", ".", "--quiet"], capsys)
    finally:
        os.chdir(cwd)
    assert rc == 2 and "names no directory of its own" in err

    out = tmp_path / "out"
    assert cli(["corpus", "--input", src, "--out", out, "--quiet"], capsys)[0] == 0
    rc, _, err = cli(["corpus", "--input", src, "--out", out, "--quiet"], capsys)
    assert rc == 2 and "--overwrite" in err and "overwrite=True" not in err
    assert cli(["corpus", "--input", src, "--out", out, "--quiet", "--overwrite"], capsys)[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert first.is_file()


def test_corpus_input_problems_are_named(tmp_path, turkish_lines, capsys):
    """Issue 10 item 7: a directory ("no such file") and a gzip input ("nul_bytes ... relax the filters")."""
    text = "\n".join(turkish_lines[:40]) + "\n"
    rc, _, err = cli(["corpus", "--input", tmp_path, "--out", tmp_path / "o1", "--quiet"], capsys)
    assert rc == 2 and "is a directory" in err and "files inside it" in err

    gz = tmp_path / "docs.txt.gz"
    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    rc, out, err = cli(["corpus", "--input", gz, "--out", tmp_path / "o2", "--quiet"], capsys)
    assert rc == 0, err
    from datasets import load_from_disk

    dd = load_from_disk(str(tmp_path / "o2"))
    assert sum(len(dd[s]) for s in dd) > 30 and set(dd["train"]["source"]) == {"docs"}

    renamed = tmp_path / "docs.txt"  # gzip content under a plain name: recognised by its first bytes
    renamed.write_bytes(gz.read_bytes())
    assert cli(["corpus", "--input", renamed, "--out", tmp_path / "o3", "--quiet"], capsys)[0] == 0

    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    rc, _, err = cli(["corpus", "--input", truncated, "--out", tmp_path / "o4", "--quiet"], capsys)
    assert rc == 2 and "cut.txt.gz" in err and "truncated" in err

    z = tmp_path / "docs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("docs.txt", text)
    rc, _, err = cli(["corpus", "--input", z, "--out", tmp_path / "o5", "--quiet"], capsys)
    assert rc == 2 and "zip archive" in err and "extract" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 4, 5))


def test_corpus_strips_byte_order_marks(tmp_path, turkish_lines, capsys):
    """Issue 10 item 11: a UTF-8 BOM was kept (and learned as part of the first word)."""
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbf" + ("\n".join(turkish_lines[:300]) + "\n").encode("utf-8"))
    assert cli(["corpus", "--input", src, "--out", tmp_path / "o", "--quiet", "--validation-percent", 10,
                "--test-percent", 10], capsys)[0] == 0
    from datasets import load_from_disk

    dd = load_from_disk(str(tmp_path / "o"))
    texts = [t for s in dd for t in dd[s]["text"]]
    assert not any("\ufeff" in t for t in texts)
    assert any(t.startswith(turkish_lines[0][:15]) for t in texts)


def _work_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if "trkit-corpus" in p.name)


def test_corpus_failure_leaves_no_work_directory(tmp_path, monkeypatch, capsys):
    """Issue 10 item 9: the work directory stayed in the temp directory after any error."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    en = tmp_path / "en.txt"
    en.write_text("Only English text lives in this file, nothing Turkish at all, really.\n" * 5, encoding="utf-8")
    rc, _, err = cli(["corpus", "--input", en, "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and "no document survived" in err
    assert _work_dirs(tmpdir) == [] and not (tmp_path / "o").exists()


def _default_sigint():
    """Ctrl-C as a terminal delivers it: a test suite started in the background (``cmd &`` in a script, as CI
    runners may) passes SIGINT on as *ignored*, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_corpus_ctrl_c_leaves_nothing_behind(tmp_path, turkish_lines):
    """A real `python -m trkit corpus` interrupted with SIGINT while it filters: exit 130, no traceback,
    no work directory in TMPDIR, no output and no staging directory."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    src = tmp_path / "big.txt"
    src.write_text("\n".join(turkish_lines * 2) + "\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "trkit", "corpus", "--input", str(src), "--out",
                             str(tmp_path / "out"), "--quiet"], cwd=tmp_path, env=subprocess_env(tmpdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 120
        while not _work_dirs(tmpdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"corpus ended before it could be interrupted: {proc.communicate()}"
        time.sleep(0.3)  # well inside the filtering loop
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _work_dirs(tmpdir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "tmp"]


def test_corpus_kill_9_leftovers_are_swept_by_the_next_run(tmp_path, turkish_lines):
    """Issue 10 item 9: a SIGKILLed `python -m trkit corpus` leaves a hidden staging directory next to --out
    (and its work directory in TMPDIR); the next run of the same stage removes both and succeeds."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    src = tmp_path / "in.txt"
    src.write_text("\n".join(turkish_lines[:4000]) + "\n", encoding="utf-8")
    argv = [sys.executable, "-m", "trkit", "corpus", "--input", str(src), "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=subprocess_env(tmpdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def staging():
        return [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".partial")]

    try:
        deadline = time.time() + 180
        while not staging() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None and staging(), "the writer finished before it could be killed mid-write"
        proc.kill()  # SIGKILL: no cleanup can run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert staging() and _work_dirs(tmpdir) and not (tmp_path / "out").exists()

    done = subprocess.run(argv, cwd=tmp_path, env=subprocess_env(tmpdir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert staging() == [] and _work_dirs(tmpdir) == []
    from trkit.artifacts import read_manifest

    assert read_manifest(tmp_path / "out")["stage"] == "corpus"


# --------------------------------------------------------------------------------------------
# tokstats
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extensions(tmp_path_factory, qwen3_tokenizer_dir, smollm2_dir, turkish_lines):
    """A 12-token extension of Qwen3 and one of SmolLM2."""
    from trkit.vocab import extend_tokenizer

    root = tmp_path_factory.mktemp("ext")
    docs = turkish_lines[:200]
    extend_tokenizer(qwen3_tokenizer_dir, docs, 12, root / "qwen", progress=False)
    extend_tokenizer(smollm2_dir, docs, 12, root / "smol", progress=False)
    return root


def test_tokstats_refuses_unrelated_or_damaged_tokenizers(tmp_path, extensions, qwen3_tokenizer_dir, capsys):
    """Issue 10 item 5: an extension of SmolLM2 against Qwen3 ("14.4% fewer"), a WordPiece tokenizer
    ("51.9% fewer"), a truncated tokenizer.json (raw EOF traceback); item 7: a nonexistent --base path, an
    invalid base tokenizer.json."""
    import shutil

    from tokenizers import Tokenizer, models

    text = tmp_path / "tr.txt"
    text.write_text("Geliyorum eve, yarın görüşürüz.\n", encoding="utf-8")
    base = ["tokstats", "--text", text]

    rc, out, err = cli([*base, "--base", "qwen3", "--tokenizer", extensions / "smol"], capsys)
    assert rc == 2 and "is not the base of the extension" in err and not out

    wp = tmp_path / "wordpiece"
    wp.mkdir()
    Tokenizer(models.WordPiece({"[UNK]": 0, "ev": 1, "##e": 2}, unk_token="[UNK]")).save(str(wp / "tokenizer.json"))
    rc, out, err = cli([*base, "--base", "qwen3", "--tokenizer", wp], capsys)
    assert rc == 2 and "not a trkit vocabulary extension" in err and not out

    cut = tmp_path / "cut"
    shutil.copytree(extensions / "qwen", cut)
    data = (cut / "tokenizer.json").read_bytes()
    (cut / "tokenizer.json").write_bytes(data[: len(data) // 2])
    rc, out, err = cli([*base, "--base", "qwen3", "--tokenizer", cut], capsys)
    assert rc == 2 and "tokenizer.json" in err and "re-run" in err

    rc, _, err = cli([*base, "--base", tmp_path / "no" / "such" / "dir", "--tokenizer", extensions / "qwen"], capsys)
    assert rc == 2 and "--base" in err and "no such tokenizer" in err

    bad_base = tmp_path / "bad-base"
    shutil.copytree(qwen3_tokenizer_dir, bad_base)
    (bad_base / "tokenizer.json").write_text('{"model": {"vocab": ', encoding="utf-8")
    rc, _, err = cli([*base, "--base", bad_base, "--tokenizer", extensions / "qwen"], capsys)
    assert rc == 2 and str(bad_base / "tokenizer.json") in err and "not a valid tokenizer.json" in err


def test_tokstats_table_lines_up_with_turkish_and_english_totals(tmp_path, extensions, capsys):
    """Issue 15 item 5: columns did not line up and ALL pooled English with Turkish."""
    tr = tmp_path / "turkce.txt"
    tr.write_text("Geliyorum eve, yarın görüşürüz.\nÖğrenciler için hazırlanmış materyaller.\n", encoding="utf-8")
    en = tmp_path / "notes.txt"
    en.write_text("The quick brown fox jumps over the lazy dog and it is fine.\n", encoding="utf-8")
    rc, out, err = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", tr, en], capsys)
    assert rc == 0
    lines = out.rstrip("\n").split("\n")
    assert len({len(line) for line in lines}) == 1, out  # every row as wide as the header: aligned
    rows = {line.split("  ")[0].strip(): line for line in lines}
    assert {"turkce", "notes", "Turkish (all)", "English (all)"} <= set(rows) and "ALL" not in rows
    assert "Turkish" in rows["turkce"] and "English" in rows["notes"]
    header = lines[0]
    col = header.index("% fewer") + len("% fewer")  # right edge of a column is the same on every row
    assert all(line[col - 1] != " " for line in lines[1:] if not set(line) <= {"-", " "})
    assert str(tr) in err  # where each text came from

    rc, out, _ = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", tr, en, "--json"], capsys)
    rep = json.loads(out)
    assert rep["totals"]["Turkish"]["tokens"] == rep["sources"]["turkce"]["tokens"]
    assert rep["totals"]["English"]["tokens"] == rep["sources"]["notes"]["tokens"]


def test_tokstats_says_which_split_and_reads_a_corpus_directory(corpus_dir, extensions, capsys):
    """Issue 15 item 6: `--text validation` used the asset split without saying so; a corpus dir is accepted."""
    from trkit.corpus import split_files

    rc, out, err = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", corpus_dir, "--json"], capsys)
    assert rc == 0
    rep = json.loads(out)
    expected = {f"tr-{k}": len(v) for k, v in split_files(corpus_dir, "validation").items()}
    assert {k: v["documents"] for k, v in rep["sources"].items()} == expected
    assert all(str(corpus_dir) in o and "'validation' split" in o for o in rep["texts"].values())
    rc, out, _ = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", corpus_dir, "--split", "test",
                      "--json"], capsys)
    assert rc == 0 and sum(s["documents"] for s in json.loads(out)["sources"].values()) == sum(
        len(v) for v in split_files(corpus_dir, "test").values())

    rc, out, err = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", "validation"], capsys)
    assert rc == 0 and "held-out validation split" in err and "pass its directory to --text" in err
    assert "Turkish (all)" in out and "English (all)" in out


def test_tokstats_refuses_invalid_utf8_naming_file_and_line(tmp_path, extensions, capsys):
    """Issue 10 item 11: tokstats replaced invalid bytes silently."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes("Geliyorum eve.\n".encode() + b"bozuk \xff bayt\n")
    rc, out, err = cli(["tokstats", "--tokenizer", extensions / "qwen", "--text", bad], capsys)
    assert rc == 2 and "bad.txt line 2 is not valid UTF-8" in err and not out


# --------------------------------------------------------------------------------------------
# bpc
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--max-length", "0"),
                                          ("--stride", "-3"), ("--batch-size", "2.5")])
def test_bpc_numeric_options_are_checked_at_parse_time(option, value, capsys):
    """Issue 10 item 3: `bpc --batch-size -1` printed a perfect 0.0000 BPC; 0 was a range() error."""
    rc, out, err = cli(["bpc", "--model", "smollm2", "--text", "x.txt", option, value], capsys)
    assert rc == 2 and f"argument {option}" in err and not out


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_bpc_checks_everything_before_loading_the_model(tmp_path, tiny_model_dir, corpus_dir, no_model_loading, capsys):
    """Issue 10 item 6: bpc loaded the model before checking --text."""
    model = ["bpc", "--model", tiny_model_dir]
    rc, _, err = cli([*model, "--text", tmp_path / "nope.txt"], capsys)
    assert rc == 2 and "nope.txt: no such file or corpus directory" in err
    rc, _, err = cli([*model, "--text", tmp_path, "--max-length", 8], capsys)
    assert rc == 2 and "not a `trkit corpus` output" in err
    (tmp_path / "t.txt").write_text("Bir belge.\n", encoding="utf-8")
    rc, _, err = cli([*model, "--text", tmp_path / "t.txt", "--max-length", 8, "--stride", 16], capsys)
    assert rc == 2 and "--stride 16 exceeds --max-length 8" in err
    rc, _, err = cli([*model, "--text", tmp_path / "t.txt", "--profile", "tpu"], capsys)
    assert rc == 2 and "unknown profile 'tpu'" in err
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    rc, _, err = cli([*model, "--text", tmp_path / "bad.txt"], capsys)
    assert rc == 2 and "bad.txt line 2 is not valid UTF-8" in err
    rc, _, err = cli(["bpc", "--model", tmp_path / "missing-model", "--text", tmp_path / "t.txt"], capsys)
    assert rc == 2 and "missing-model" in err
    rc, _, err = cli([*model, "--tokenizer", "qwen3", "--text", tmp_path / "t.txt"], capsys)
    assert rc == 2 and "is not the tokenizer of --model" in err


def test_bpc_refuses_pickle_only_and_truncated_checkpoints(tmp_path, tiny_model_dir, no_model_loading, capsys):
    """Issue 10 item 7: a pytorch_model.bin-only dir, a truncated single-file checkpoint."""
    import shutil

    text = tmp_path / "t.txt"
    text.write_text("Bir belge daha.\n", encoding="utf-8")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    rc, _, err = cli(["bpc", "--model", pickles, "--text", text], capsys)
    assert rc == 2 and "safetensors is required" in err and "pytorch_model.bin" in err

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    rc, _, err = cli(["bpc", "--model", cut, "--text", text], capsys)
    assert rc == 2 and str(weights) in err and "truncated" in err and "re-download" in err


def test_bpc_reads_a_corpus_dir_with_progress_and_language_totals(tmp_path, tiny_model_dir, corpus_dir, capsys):
    """Issue 15 item 6: `bpc --text` takes what tokstats takes; issue 10 item 10: progress on stderr under --json."""
    en = tmp_path / "en.txt"
    en.write_text("The quick brown fox jumps over the lazy dog.\nReturn the value of the named attribute.\n",
                  encoding="utf-8")
    rc, out, err = cli(["bpc", "--model", tiny_model_dir, "--text", corpus_dir, en, "--json", "--max-length", 64,
                        "--dtype", "float32"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert set(report["totals"]) == {"Turkish", "English"}
    assert report["files"][str(en)]["language"] == "English"
    tr = [r for r in report["files"].values() if r["language"] == "Turkish"]
    assert report["totals"]["Turkish"]["chars"] == sum(r["chars"] for r in tr)
    assert "win/s" in err or "win]" in err  # the tqdm bar, on stderr, although --json
    assert str(corpus_dir) in err
    rc, out, err = cli(["bpc", "--model", tiny_model_dir, "--text", en, "--json", "--quiet", "--max-length", 64], capsys)
    assert rc == 0 and "win/s" not in err and "win]" not in err


# --------------------------------------------------------------------------------------------
# the command line itself
# --------------------------------------------------------------------------------------------


FAKE_STAGE = '''
import json


def add_arguments(parser):
    parser.add_argument("what")


def run_cli(args):
    from trkit.options import check_output

    if args.what == "trkit-value":
        check_output(".")  # trkit's own ValueError
    if args.what == "library-value":
        raise ValueError("raised outside trkit: a bug")
    if args.what == "key":
        {}["missing"]
    if args.what == "json":
        json.loads("{not json")
    if args.what == "module":
        import a_package_that_is_not_installed  # noqa: F401
    if args.what == "oserror":
        open("/no/such/file/anywhere")
    return 0
'''


def test_main_turns_user_errors_into_one_line_and_keeps_bug_tracebacks(tmp_path, monkeypatch, capsys):
    from trkit import cli as cli_module

    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli_module.COMMANDS, "fake", ("fake_stage", "a stage for this test"))
    for what, expected in [("trkit-value", "names no directory of its own"), ("json", "invalid JSON"),
                           ("module", "pip install a_package_that_is_not_installed"),
                           ("oserror", "No such file or directory")]:
        rc, _, err = cli(["fake", what], capsys)
        assert rc == 2 and err.startswith("trkit fake: error: ") and expected in err, (what, err)
        assert err.count("\n") == 1, err
    with pytest.raises(ValueError, match="a bug"):
        main(["fake", "library-value"])
    with pytest.raises(KeyError):
        main(["fake", "key"])
    monkeypatch.setenv("TRKIT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="names no directory"):
        main(["fake", "trkit-value"])


def test_env_without_trkit_dependencies_is_one_line(tmp_path):
    """Issue 15 item 6: `python -m trkit env` from an interpreter without trkit's dependencies ended in a
    psutil traceback. `python -S` drops site-packages: no psutil, no torch."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from trkit.cli import main; raise SystemExit(main(['env']))"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "no module 'psutil'" in done.stderr and "pip install" in done.stderr


def test_messages_use_command_line_words_only():
    """Issue 15 item 6: no "pass overwrite=True (--overwrite)" style mixtures in these stages' messages."""
    import re

    for name in ("corpus.py", "tokstats.py", "evaluation.py", "cli.py", "options.py"):
        source = (REPO / "trkit" / name).read_text(encoding="utf-8")
        assert not re.search(r"\w+=\w+ \(--[\w-]+\)", source), name
        assert not re.search(r"\(--[\w-]+\)", "\n".join(ln for ln in source.splitlines() if "raise" in ln)), name


def test_notebook_kernel_starts_without_the_tcp_warning(tmp_path, capfd):
    """Issue 15 item 6: three `[IPKernelApp] WARNING | Kernel is running over TCP` lines per demo run."""
    from trkit import notebooks

    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "00_tiny.py").write_text('# %% tags=["parameters"]\nx = 1\n\n# %%\nprint(x + 1)\n', encoding="utf-8")
    path = notebooks.run_notebook("00_tiny", tmp_path / "out", {"x": 2}, directory=nb)
    out, err = capfd.readouterr()
    assert "running over TCP" not in out + err
    import nbformat

    outputs = [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])]
    assert any("3" in o.get("text", "") for o in outputs)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00_tiny.ipynb"]  # no socket files left
    if os.name == "posix":  # unique absolute socket names: two runs in one directory cannot collide
        config = notebooks._kernel_transport()["config"]
        assert config.KernelManager.transport == "ipc" and Path(config.KernelManager.ip).is_absolute()
        assert config.KernelManager.ip != notebooks._kernel_transport()["config"].KernelManager.ip
