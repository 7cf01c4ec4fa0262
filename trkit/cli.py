"""Command line: ``python -m trkit <stage> ...`` over the same functions the notebooks call.

Each stage lives in its own module. This file only knows the stage names, their module and a
one-line help, so ``python -m trkit --help`` imports nothing heavy (no torch, no transformers)
and answers in a fraction of a second. A stage module provides two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run_cli(args: argparse.Namespace) -> int          # the exit code

and must itself import torch / transformers lazily (inside functions), because the module is
imported to build its sub-parser.

Errors. A stage checks its inputs first and raises an exception whose message says what to change;
:func:`main` prints it as ``trkit <stage>: error: ...`` and exits with 2, never with a traceback:
``ValueError``/``RuntimeError`` raised by trkit's own code (``trkit.checkpoints.CheckpointError``
included), any ``OSError`` (a missing file, a full disk, a refused download, an existing ``--out``),
JSON and UTF-8 decoding errors (bad bytes in a user's file), and a missing package (the message names
what to install). Anything else, and a ``ValueError``/``RuntimeError`` raised inside a library, is a
bug and keeps its traceback (``TRKIT_TRACEBACK=1`` shows the traceback of every error). Ctrl-C exits
with 130 and SIGTERM with 143, after the stage's cleanup ran (temporary directories removed, no
half-written output renamed into place).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

# stage name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("trkit.profiles", "report the hardware and the profile trkit picks for it"),
    "assets": ("trkit.assets", "fetch, verify and describe the offline assets (tokenizer, corpus, SmolLM2)"),
    "notebooks": ("trkit.notebooks", "run the notebooks headless (jupytext + papermill)"),
    "corpus": ("trkit.corpus", "clean, deduplicate and split a Turkish corpus"),
    "vocab": ("trkit.vocab", "learn Turkish BPE merges appended to a byte-level BPE tokenizer"),
    "tokstats": ("trkit.tokstats", "fertility / compression report of a tokenizer against its base"),
    "embed": ("trkit.embeddings", "resize a checkpoint's embeddings and initialise the new rows"),
    "bpc": ("trkit.evaluation", "bits per character / per byte of a model on raw text"),
    "memory": ("trkit.memory", "pre-flight estimate of training memory per GPU profile"),
    "distill": ("trkit.distill", "teacher cache for knowledge distillation (`distill cache`), exact across an extended vocabulary"),
    "train": ("trkit.train", "train the new-token rows and QLoRA/DoRA adapters (NEFTune, SophiaG, exact resume)"),
    "evaluate": ("trkit.report", "report per model: tokens/word, bits per char, generation speed, TurkMorfBench, lm-eval"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the sub-parser of ``load`` (if given) imports its module."""
    parser = argparse.ArgumentParser(
        prog="python -m trkit",
        description="trkit: adapt Qwen3 to Turkish on one GPU. Stages run in pipeline order.",
    )
    parser.add_argument("--version", action="store_true", help="print the trkit version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser


# import name -> pip name, where they differ (for the "install it" message)
_PIP_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "google": "google-colab"}
_TRKIT_DIR = Path(__file__).resolve().parent


def _raised_in_trkit(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is trkit's own code (not a library's)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return _TRKIT_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents
    except OSError:
        return False


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("trkit"):
        top = exc.name.split(".")[0]
        pip = _PIP_NAMES.get(top, top)
        return (f"the Python running trkit ({sys.executable}) has no module {top!r}. Run trkit from the environment "
                f"it was installed in (e.g. .venv/bin/python -m trkit), or install its dependencies there: "
                f"pip install -e . in the trkit checkout (or just: pip install {pip})")
    if isinstance(exc, ImportError):
        if (exc.name or "").startswith("trkit") or "trkit" in str(exc):
            return None  # trkit importing something of its own that is not there: a bug
        return f"{str(exc).strip().splitlines()[0]} (a missing optional package: install what it names)"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA or MPS)
        return (f"out of memory ({str(exc).splitlines()[0][:160]}): lower --batch-size (or --max-length), or pick a "
                "smaller --profile")
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc}): a file trkit read is damaged or not JSON"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not valid UTF-8 ({exc}); re-encode it as UTF-8"
    if isinstance(exc, (ValueError, RuntimeError)) and _raised_in_trkit(exc):
        return str(exc)
    return None


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so ``finally`` blocks (temporary directories) run."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    stage = command if command in COMMANDS else None
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser(load=stage)
        args = parser.parse_args(argv)
        if args.version:
            from trkit import __version__

            print(__version__)
            return 0
        if not args.command:
            parser.print_help()
            return 0
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run_cli(args) or 0)
    except KeyboardInterrupt:
        print(f"trkit {stage or ''}: interrupted (nothing half-written was kept)".replace("  ", " "), file=sys.stderr)
        return 130
    except _Terminated:
        print(f"trkit {stage or ''}: terminated (nothing half-written was kept)".replace("  ", " "), file=sys.stderr)
        return 143
    except Exception as exc:
        message = user_error(exc)
        if message is None or os.environ.get("TRKIT_TRACEBACK"):
            raise
        print(f"trkit {stage or ''}: error: {message}".replace("  ", " "), file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
