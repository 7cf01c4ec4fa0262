import subprocess
import sys
import time


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, trkit, trkit.cli; trkit.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "trkit", "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    assert "vocab" in out.stdout and "embed" in out.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.2f}s"  # ~0.1 s on an idle machine; slack for a loaded CI box


def test_every_stage_module_exposes_the_cli_contract():
    import importlib

    from trkit.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)  # every listed stage must import: a missing dependency fails here
        assert callable(getattr(mod, "add_arguments", None)), f"{module} lacks add_arguments"
        assert callable(getattr(mod, "run_cli", None)), f"{module} lacks run_cli"


def test_every_stage_builds_its_parser_without_heavy_imports():
    """cli.py's contract: a stage module imports torch & co lazily, so `python -m trkit <stage> --help` is fast."""
    code = ("import sys; from trkit.cli import COMMANDS, build_parser\n"
            "for name in COMMANDS:\n"
            "    build_parser(load=name)\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_and_clean_error():
    out = subprocess.run([sys.executable, "-m", "trkit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip()
    bad = subprocess.run([sys.executable, "-m", "trkit", "env", "--profile", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown profile 'tpu'" in bad.stderr and "Traceback" not in bad.stderr
