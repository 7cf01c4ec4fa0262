"""Command-line option checks, in one place, used by every stage: numbers at parse time, paths before any work.

What it does. ``argparse`` types that refuse a bad number while the command line is parsed
(``--batch-size -1`` is an error with the option's name, never a perfect-looking 0.0000 bits per
character), and :func:`check_output` which every stage calls *before* its expensive work: an
``--out`` that is, contains or lies inside one of the stage's inputs is refused (a replaced output
would delete the input), an existing ``--out`` is refused without ``--overwrite``, and with it only a
directory that a trkit stage wrote (it has a ``trkit_manifest.json``) may be replaced, so a user's
own folder is never deleted. ``atomic_directory`` (:mod:`trkit.artifacts`) runs the same check again
when it finally renames the new output into place.

Messages use the command line's words (``--out``, ``--overwrite``); Python callers pass the same
names as keyword arguments.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Iterable

MANIFEST_NAME = "trkit_manifest.json"


# --------------------------------------------------------------------------------------------
# Numbers (argparse ``type=`` callables: argparse turns their ArgumentTypeError into "argument --x: ...")
# --------------------------------------------------------------------------------------------


def _number(kind, text: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, steps, batch sizes)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (0 usually means "off" or "all"; the option's help says which)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1] (shares, thresholds, weights)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def open_unit_interval(text: str) -> float:
    """A number in (0, 1] (a similarity threshold, a penalty factor)."""
    value = _number(float, text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def probability_below_one(text: str) -> float:
    """A number in [0, 1) (dropout)."""
    value = _number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def percent(text: str) -> float:
    """A number in [0, 100)."""
    value = _number(float, text)
    if not 0.0 <= value < 100.0:
        raise argparse.ArgumentTypeError(f"must be a percentage in [0, 100), got {text}")
    return value


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def is_trkit_output(directory: str | os.PathLike) -> bool:
    """True for a directory a trkit stage wrote (it holds ``trkit_manifest.json``)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    require_manifest: bool = True,
    option: str = "--out",
) -> Path:
    """Refuse an output directory that would lose data; call it before any expensive work.

    * ``out`` must have a name (``--out .`` or ``--out /`` cannot be renamed into place) and must not
      be a file;
    * it must not be, contain, or lie inside any of ``inputs`` (paths that do not exist, hub names and
      ``None`` are skipped);
    * an existing ``out`` needs ``overwrite``, and then (with ``require_manifest``) must be a trkit
      output, so only what trkit wrote is ever replaced.

    Returns ``out`` as an absolute path.
    """
    raw = Path(out)
    real = _real(raw)
    if str(out).strip() in ("", ".", "..") or real.name in ("", ".", "..") or real == Path(real.anchor):
        raise ValueError(f"{option} {str(out)!r} names no directory of its own: pass a new directory, e.g. "
                         f"{option} runs/my_output (trkit writes a whole directory and renames it into place)")
    for item in inputs:
        if item is None:
            continue
        text = str(item)
        if not text or not os.path.exists(text):
            continue  # a hub name, an alias, or 'default'
        src = _real(text)
        if _within(real, src) or _within(src, real):
            how = ("is" if real == src else "lies inside" if _within(real, src) else "contains")
            raise ValueError(f"{option} {raw} {how} the input {text}: replacing it would destroy that input; "
                             f"choose an {option} outside every input")
    if real.exists() or raw.is_symlink():
        if not real.is_dir():
            raise ValueError(f"{option} {raw} exists and is not a directory; choose another {option}")
        if not overwrite:
            raise FileExistsError(f"{option} {raw} already exists; choose another {option} or pass --overwrite "
                                  "to replace it")
        if require_manifest and not is_trkit_output(real):
            raise ValueError(f"{option} {raw} exists and was not written by trkit (it has no {MANIFEST_NAME}): "
                             f"refusing to replace it even with --overwrite; choose another {option}")
    return real
