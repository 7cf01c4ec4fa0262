"""trkit.report: the evaluate stage (schema, files, tables) and its command line (bad input refused early)."""

from __future__ import annotations

import json

import pytest

from trkit import report
from trkit.cli import main

SIZES = ["--turkish-chars", "1200", "--english-chars", "600", "--prompts", "2", "--prompt-words", "4",
         "--max-new-tokens", "3", "--morph-items", "6", "--max-length", "64", "--profile", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def ext_checkpoint(tmp_path_factory, tiny_qwen3_dir, qwen_ext):
    """The tiny Qwen3 extended at init with the 64-token Turkish extension (trkit embed's surgery)."""
    from trkit.embeddings import extend_checkpoint

    out = tmp_path_factory.mktemp("ext-ckpt") / "tiny-tr64"
    extend_checkpoint(tiny_qwen3_dir, qwen_ext, out, init="fvt", output_init="first", progress=False)
    return out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_qwen3_dir, ext_checkpoint):
    out = tmp_path_factory.mktemp("eval") / "report"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["evaluate", "--model", str(tiny_qwen3_dir), "--label", "base", "--model", str(ext_checkpoint),
                     "--label", "ext", "--out", str(out), "--json", *SIZES])
    assert code == 0
    return out, json.loads(stdout.getvalue())


def _fraction(x):
    return x is None or 0.0 <= x <= 1.0


def test_report_schema_and_files(cli_run):
    out, printed = cli_run
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert printed == on_disk
    assert [m["label"] for m in on_disk["models"]] == ["base", "ext"]
    for m in on_disk["models"]:
        assert {"label", "model", "adapter", "bits_per_char", "tokens_per_word", "generation", "turkmorfbench"} <= set(m)
        assert set(m["bits_per_char"]) >= {"turkish", "english"} and all(v > 0 for v in m["bits_per_char"].values())
        assert set(m["tokens_per_word"]) == {"turkish", "english"}
        g = m["generation"]
        assert {"chars_per_s", "tokens_per_s", "chars_per_token", "new_token_share", "reference_new_token_share",
                "turkish_share"} <= set(g)
        assert all(_fraction(g[k]) for k in ("new_token_share", "reference_new_token_share", "turkish_share"))
        assert g["continuations"] == 4 and len(g["samples"]) == 4  # 2 prompts, greedy + sampled
        t = m["turkmorfbench"]
        assert {"accuracy", "real", "nonce", "items"} <= set(t) and t["items"] == 6
        assert all(_fraction(t[k]) for k in ("accuracy", "real", "nonce"))
        assert m["lm_eval"] is None
    base, ext = on_disk["models"]
    # the extension spends fewer tokens on Turkish than the base tokenizer, and its encoding uses new ids
    assert ext["tokens_per_word"]["turkish"] < base["tokens_per_word"]["turkish"]
    assert ext["pct_fewer_tokens"]["turkish"] > 0 == base["pct_fewer_tokens"]["turkish"]
    assert base["generation"]["reference_new_token_share"] == 0.0 < ext["generation"]["reference_new_token_share"]
    assert base["generation"]["new_token_share"] == 0.0
    assert on_disk["prompts"] == [s["prompt"] for s in base["generation"]["samples"][::2]]  # same prompts for both
    assert on_disk["turkmorfbench_info"]["items"] == 6 and len(on_disk["turkmorfbench_info"]["leaderboard"]) == 17
    for name in ["report.md", *report.PLOTS.values()]:
        assert (out / name).stat().st_size > 0
    from trkit.artifacts import read_manifest

    assert read_manifest(out, verify=True)["stage"] == "evaluate"


def test_markdown_tables(cli_run):
    out, rep = cli_run
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.endswith(report.markdown_tables(rep))
    for heading in ("Tokenizer and bits per character", "Generation", "TurkMorfBench (forced choice)", "per bucket"):
        assert heading in md
    row = next(line for line in md.splitlines() if line.startswith("| ext |"))
    assert f"{rep['models'][1]['bits_per_char']['turkish']:.4f}" in row
    assert "kanarya-2b 78.4" in md and "6 of the 1836 core items" in md
    assert "not run on the cpu profile" in md
    # greedy and sampled continuations also reported apart: one row per model and mode
    by_mode = md.split("### Generation by decoding mode")[1].split("###")[0]
    assert sum(line.startswith(("| base | greedy", "| ext | greedy", "| base | sampled", "| ext | sampled"))
               for line in by_mode.splitlines()) == 4


def test_plots_are_figures(cli_run):
    from matplotlib.figure import Figure

    _, rep = cli_run
    for plot in report.PLOTTERS.values():
        assert isinstance(plot(rep), Figure)


def test_sample_documents():
    docs = [f"doc{i} " + "x" * i for i in range(50)]
    picked = report.sample_documents(docs, 300)
    assert 300 <= sum(map(len, picked)) < 300 + 60
    assert picked == [d for d in docs if d in picked]  # file order kept
    assert report.sample_documents(docs, 300) == picked  # seeded
    assert report.sample_documents(docs, 0) == docs


@pytest.fixture
def no_loading(monkeypatch):
    """Bad input must be refused before any model is loaded."""
    import trkit.loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(trkit.loading, "load_model", boom)
    monkeypatch.setattr(trkit.loading, "load_tokenizer", boom)


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/o"], "no model to evaluate"),
    (["--model", "qwen3-tiny", "--adapter", "{tmp}/nothing", "--out", "{tmp}/o"], "no adapter_config.json"),
    (["--model", "qwen3-tiny", "--model", "qwen3-tiny", "--out", "{tmp}/o"], "--label NAME"),
    (["--model", "{tmp}", "--out", "{tmp}/o"], "lies inside the input"),
    (["--model", "qwen3-tiny", "--out", "{tmp}/exists"], "already exists"),
    (["--model", "qwen3-tiny", "--text", "{tmp}/missing.txt", "--out", "{tmp}/o"], "no such text file"),
])
def test_bad_input_is_refused_early(argv, message, tmp_path, capsys, no_loading):
    (tmp_path / "exists").mkdir()
    code = main(["evaluate", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "x", "--model", "m", "--out", "o"], "put it after the --model"),
    (["--model", "m", "--label", "a", "--label", "b", "--out", "o"], "--label given twice"),
    (["--model", "m", "--morph-items", "-1", "--out", "o"], "must be an integer >= 0"),
    (["--model", "m", "--prompts", "0", "--out", "o"], "must be an integer >= 1"),
])
def test_bad_options_are_parse_errors(argv, message, capsys, no_loading):
    with pytest.raises(SystemExit) as err:
        main(["evaluate", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_explicit_tasks_without_lm_eval_is_one_line(monkeypatch, tmp_path, capsys, no_loading):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code = main(["evaluate", "--model", "qwen3-tiny", "--tasks", "xcopa_tr", "--out", str(tmp_path / "o"), "--profile", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lm-evaluation-harness is not installed" in err and "pip install" in err
    assert len(err.splitlines()) == 1


def _fake_run(root, name="run"):
    """A directory laid out as ``trkit train`` leaves it: adapter (own manifest), a checkpoint, the log,
    the model card twice, and the run's manifest over all of it."""
    from trkit.artifacts import write_manifest

    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoint-2").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights" * 64)
    (run / "adapter" / "README.md").write_text("# run: Turkish adapter trained with trkit\n\nbefore/after\n")
    write_manifest(run / "adapter", "train-adapter", model="m")
    (run / "checkpoint-2" / "optimizer.safetensors").write_bytes(b"\x01state" * 64)
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (run / "README.md").write_text("# run: Turkish adapter trained with trkit\n\nbefore/after\n")
    write_manifest(run, "train", model="m", adapter="adapter", steps=2)
    return run


def test_report_tables_go_into_the_training_runs_model_cards(cli_run, tmp_path):
    import os

    from trkit.artifacts import read_manifest

    _, rep = cli_run
    run = _fake_run(tmp_path)
    foreign = tmp_path / "foreign-adapter"  # not a trkit train output: never touched
    foreign.mkdir()
    (foreign / "README.md").write_text("mine\n")
    rep = {**rep, "models": [{**rep["models"][0], "adapter": str(foreign)},
                             {**rep["models"][1], "adapter": str(run / "adapter")}]}
    inode = {p: os.stat(run / p).st_ino for p in ("adapter/adapter_model.safetensors", "checkpoint-2/optimizer.safetensors")}
    for _ in range(2):  # a second evaluation replaces the section, it does not append another
        assert report.add_to_model_cards(rep) == [run.resolve()]
        for card in (run / "README.md", run / "adapter" / "README.md"):
            text = card.read_text()
            assert text.startswith("# run: Turkish adapter trained with trkit\n\nbefore/after\n")
            assert text.count(report.CARD_SECTION) == 1 and "row **ext**" in text
            assert text.endswith(report.markdown_tables(rep))
        assert read_manifest(run, verify=True)["stage"] == "train"  # every hash true, the cards' included
        assert read_manifest(run / "adapter", verify=True)["stage"] == "train-adapter"
        # the other files are untouched: same inode, same bytes
        assert {p: os.stat(run / p).st_ino for p in inode} == inode
    assert (foreign / "README.md").read_text() == "mine\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no leftovers of the rebuild"


def test_model_cards_survive_sigkill_at_any_moment(cli_run, tmp_path):
    """A real process updating the cards in a loop, killed with SIGKILL at random moments: every time, both
    manifests verify (the adapter loads) and the card is the old one or the new one, never a half."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from trkit.artifacts import read_manifest

    _, rep = cli_run
    run = _fake_run(tmp_path)
    rep = {**rep, "models": [rep["models"][0], {**rep["models"][1], "adapter": str(run / "adapter")}]}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    ready = tmp_path / "ready"
    child = ("import json, pathlib, sys\nfrom trkit import report\n"
             "rep = json.loads(pathlib.Path(sys.argv[1]).read_text())\nreport.add_to_model_cards(rep)\n"
             "pathlib.Path(sys.argv[2]).touch()\nwhile True:\n    report.add_to_model_cards(rep)\n")
    rng = random.Random(0)
    for _ in range(4):
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "report.json"), str(ready)])
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the child never finished its first update"
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        read_manifest(run, verify=True)
        read_manifest(run / "adapter", verify=True)
        for card in (run / "README.md", run / "adapter" / "README.md"):
            text = card.read_text()
            assert text.startswith("# run: Turkish adapter trained with trkit\n\nbefore/after\n")
            assert text.count(report.CARD_SECTION) == 1 and text.endswith(report.markdown_tables(rep))


@pytest.mark.parametrize("flag", [False, True])
def test_model_cards_flag_reaches_the_cards(flag, cli_run, tmp_path, monkeypatch, capsys):
    """``evaluate --model-cards`` puts the tables in the evaluated run's card; without it the run is untouched."""
    _, rep = cli_run
    run = _fake_run(tmp_path)
    (run / "adapter" / "adapter_config.json").write_text("{}")  # what check_specs looks for
    card = (run / "README.md").read_text()
    fake = {**rep, "models": [rep["models"][0], {**rep["models"][1], "adapter": str(run / "adapter")}]}
    monkeypatch.setattr(report, "evaluate_models", lambda *a, **k: fake)  # the measuring is tested above
    argv = ["evaluate", "--model", "qwen3-tiny", "--label", "base", "--model", "qwen3-tiny", "--adapter",
            str(run / "adapter"), "--label", "ext", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv + (["--model-cards"] if flag else [])) == 0
    text = (run / "README.md").read_text()
    assert (report.CARD_SECTION in text) == flag and text.startswith(card)
    capsys.readouterr()
