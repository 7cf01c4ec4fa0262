"""Colab glue: where outputs go (Google Drive when mounted), and the Hugging Face token.

A Colab runtime is recycled after ~12 h (or 90 min idle on the free tier), so every stage writes its
artifacts and checkpoints under a work directory that survives it: ``/content/drive/MyDrive/trkit``
once Drive is mounted. The token for gated or private hub repos comes from the environment
(``HF_TOKEN``) or Colab's Secrets panel (``userdata.get('HF_TOKEN')``); it is returned to the caller,
never printed, logged or written into a notebook's outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

from trkit.profiles import is_colab

DRIVE_ROOT = Path("/content/drive")
DRIVE_WORKDIR = DRIVE_ROOT / "MyDrive" / "trkit"


def mount_drive(mount: bool = True) -> Path | None:
    """Mount Google Drive on Colab (asks the user once); elsewhere a no-op returning None."""
    if not (mount and is_colab()):
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    if not (DRIVE_ROOT / "MyDrive").exists():
        drive.mount(str(DRIVE_ROOT))
    DRIVE_WORKDIR.mkdir(parents=True, exist_ok=True)
    return DRIVE_WORKDIR


def default_workdir(workdir: str | os.PathLike | None = None) -> Path:
    """``workdir`` if given; on Colab with Drive mounted the Drive folder; else ``./trkit-work``."""
    if workdir:
        path = Path(workdir)
    elif is_colab() and (DRIVE_ROOT / "MyDrive").exists():
        path = DRIVE_WORKDIR
    else:
        path = Path("trkit-work")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def hf_token() -> str | None:
    """The Hugging Face token from ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` or Colab secrets, else None."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    if is_colab():
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            return userdata.get("HF_TOKEN")
        except Exception:  # secret missing or notebook access not granted: run without a token
            return None
    return None
