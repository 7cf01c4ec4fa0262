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


def settings_form(values: dict, choices: dict | None = None, title: str = "settings"):
    """An ipywidgets form over ``values`` (edited in place as the user changes a field); returns the widget.

    Numbers get number boxes, booleans checkboxes, strings text boxes, and a key in ``choices`` a
    drop-down. Headless runs (papermill) never see it change, so the notebook's parameters stay the
    source of truth there; interactively, change a field and run the next cells.
    """
    import ipywidgets as widgets

    choices = choices or {}
    rows = []
    for key, value in values.items():
        if key in choices:
            w = widgets.Dropdown(options=list(choices[key]), value=value, description=key)
        elif isinstance(value, bool):
            w = widgets.Checkbox(value=value, description=key)
        elif isinstance(value, int):
            w = widgets.IntText(value=value, description=key)
        elif isinstance(value, float):
            w = widgets.FloatText(value=value, description=key)
        else:
            w = widgets.Text(value="" if value is None else str(value), description=key)
        w.style = {"description_width": "140px"}

        def update(change, key=key, kind=type(value)):
            new = change["new"]
            values[key] = None if (new == "" and kind is type(None)) else new

        w.observe(update, names="value")
        rows.append(w)
    return widgets.VBox([widgets.HTML(f"<b>{title}</b> (change a value, then run the next cells)"), *rows])
