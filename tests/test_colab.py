from trkit import colab


def test_token_from_environment_only(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert colab.hf_token() is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_b")
    assert colab.hf_token() == "hf_secret_b"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_a")
    assert colab.hf_token() == "hf_secret_a"


def test_workdir_off_colab(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert colab.mount_drive(True) is None  # not on Colab: nothing to mount
    assert colab.default_workdir() == (tmp_path / "trkit-work").resolve()
    assert colab.default_workdir(tmp_path / "x").is_dir()


def test_setup_notebook_never_prints_the_token(monkeypatch, tmp_path):
    from trkit import notebooks

    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_123")
    path = notebooks.run_notebook("00_setup", tmp_path, {"profile": "cpu", "workdir": str(tmp_path / "w"),
                                                         "check_assets": False})
    text = path.read_text(encoding="utf-8")
    assert "hf_do_not_leak_123" not in text and "found (not shown)" in text
