"""Command line: ``python -m trkit <stage> ...`` over the same functions the notebooks call.

Each stage lives in its own module. This file only knows the stage names, their module and a
one-line help, so ``python -m trkit --help`` imports nothing heavy (no torch, no transformers)
and answers in a fraction of a second. A stage module provides two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run_cli(args: argparse.Namespace) -> int          # the exit code

and must itself import torch / transformers lazily (inside functions), because the module is
imported to build its sub-parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.version:
        from trkit import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run_cli(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # Our own validation errors carry a message that says what to change: show it plainly.
        print(f"trkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
