"""The repo's promises about itself: README's two commands, CI calls the test one, docstrings."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert "notebooks run" in demo and "--profile cpu" in demo
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test.strip() in ci


def test_every_module_has_a_docstring():
    for path in sorted((ROOT / "trkit").glob("*.py")):
        text = path.read_text(encoding="utf-8").lstrip()
        assert text.startswith('"""'), f"{path.name} must start with a docstring"


def test_colab_requirements_never_pin_torch():
    reqs = (ROOT / "requirements-colab.txt").read_text(encoding="utf-8")
    assert not re.search(r"^\s*torch\b", reqs, flags=re.M)
