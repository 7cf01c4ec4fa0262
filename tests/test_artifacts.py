import json

import pytest

from trkit.artifacts import (atomic_directory, atomic_write_json, atomic_write_text, read_manifest, sha256_file,
                             write_manifest)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(ZeroDivisionError):
        from trkit.artifacts import atomic_path

        with atomic_path(target) as tmp:
            tmp.write_text("half")
            1 / 0
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_atomic_directory_refuses_existing_and_replaces_when_told(tmp_path):
    out = tmp_path / "stage"
    with atomic_directory(out) as d:
        (d / "x.txt").write_text("1")
        write_manifest(d, stage="test")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as d:
            (d / "x.txt").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (out / "x.txt").read_text() == "1"  # the failed rewrite left the old directory intact
    with atomic_directory(out, overwrite=True) as d:
        (d / "x.txt").write_text("2")
    assert (out / "x.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_overwrite_replaces_only_trkit_outputs_and_never_an_input(tmp_path):
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not written by trkit"):
        with atomic_directory(mine, overwrite=True):
            pass
    assert (mine / "thesis.txt").read_text() == "years of work"
    corpus = tmp_path / "data" / "my_corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("x\n")
    for out, how in ((corpus.parent, "contains"), (corpus, "is"), (corpus / "sub", "lies inside")):
        with pytest.raises(ValueError, match=how):
            with atomic_directory(out, overwrite=True, inputs=[corpus]):
                pass
    assert corpus.read_text() == "x\n"
    with pytest.raises(ValueError, match="names no directory"):
        with atomic_directory(".", inputs=[]):
            pass


def test_a_killed_writer_leaves_nothing_the_next_write_keeps(tmp_path):
    """A real process killed with SIGKILL mid-write leaves a .partial directory; the next write sweeps it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ckpt"
    code = ("import sys, time; from trkit.artifacts import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as d:\n"
            "    (d / 'big.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(left) == 1 and left[0].endswith(".partial")
    time.sleep(0.05)
    with atomic_directory(out) as d:
        (d / "ok.txt").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_manifest_detects_truncation_and_changes(tmp_path):
    atomic_write_text(tmp_path / "weights.bin", "0123456789")
    m = write_manifest(tmp_path, stage="test", note="x")
    assert m["files"]["weights.bin"] == sha256_file(tmp_path / "weights.bin")
    assert read_manifest(tmp_path)["note"] == "x"
    with open(tmp_path / "weights.bin", "r+") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        read_manifest(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ValueError, match="missing"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no trkit_manifest.json"):
        read_manifest(tmp_path / "nothing")


def test_artifacts_get_ordinary_permissions(tmp_path):
    import os
    import stat

    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_directory(tmp_path / "d") as d:
        (d / "b.txt").write_text("y")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
