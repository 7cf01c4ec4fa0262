"""Every notebook's .py/.ipynb pair is in sync, and every notebook runs headless on the cpu profile."""

import json

import nbformat
import pytest

from trkit import notebooks


def test_pairs_in_sync():
    assert notebooks.list_notebooks(), "no notebooks found"
    assert notebooks.check_pairs() == []


def test_notebooks_start_with_badge_install_and_parameters():
    import jupytext

    for name in notebooks.list_notebooks():
        nb = jupytext.read(notebooks.notebooks_dir() / f"{name}.py")
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "colab-badge" in first.source, name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "google.colab" in code[0].source and "pip" in code[0].source, f"{name}: install cell first"
        assert "parameters" in code[1].metadata.get("tags", []) and "profile" in code[1].source, name


def test_runner_names_the_failing_cell(tmp_path):
    bad = tmp_path / "nb"
    bad.mkdir()
    (bad / "99_broken.py").write_text(
        '# %% [markdown]\n# # Broken\n\n# %% tags=["parameters"]\nprofile = "cpu"\n\n'
        "# %% [markdown]\n# ## Step that fails\n\n# %%\nraise ValueError('boom')\n"
    )
    with pytest.raises(RuntimeError, match=r"99_broken: code cell 2 failed \(in step: Step that fails\): ValueError: boom"):
        notebooks.run_notebook("99_broken", tmp_path / "out", {"profile": "cpu"}, directory=bad)


def test_parameter_names_are_read_from_the_parameters_cell(tmp_path):
    (tmp_path / "98_params.py").write_text(
        '# %% [markdown]\n# # P\n\n# %% tags=["parameters"]\nprofile = "cpu"\nsteps: int = 3\na = b = 1\n\n'
        "# %%\nnot_a_parameter = 2\n"
    )
    assert notebooks.parameter_names("98_params", tmp_path) == {"profile", "steps", "a", "b"}
    assert "report_dir" in notebooks.parameter_names("05_eval")


@pytest.mark.parametrize("name", notebooks.list_notebooks())
def test_notebook_runs_headless_on_cpu(name, tmp_path_factory):
    """Every notebook, in order, on the cpu profile with the smoke sizes (same code paths, tiny sizes);
    the demo (README's first command) runs the same notebooks at the cpu profile's real sizes."""
    out = tmp_path_factory.getbasetemp() / "notebook-run"  # shared: later notebooks read earlier ones' work
    path = notebooks.run_notebooks([name], "cpu", out, extra={"smoke": True})[0]
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # headless runs leave readable text progress, not widget state (issue 15)
    widgets = [o for c in nb.cells for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not widgets, f"{name}: {len(widgets)} progress widgets saved in a headless run"
    assert "\ufffd" not in json.dumps(nb, ensure_ascii=False), f"{name}: a replacement character is displayed"
    if name == "05_eval":  # the report lands where the README says: <out>/report/report.md
        assert (out / "report" / "report.md").is_file() and (out / "report" / "report.json").is_file()
        from trkit.report import CARD_SECTION  # and its tables are in the training run's model card

        assert CARD_SECTION in (out / "work" / "train-adapters" / "README.md").read_text(encoding="utf-8")
