"""Progress bars that read well everywhere: widgets in a live notebook, plain text in logs and saved notebooks.

``tqdm.auto`` draws an ipywidgets bar inside Jupyter. A notebook executed headless (papermill, the
test suite, ``python -m trkit notebooks run``) then saves widget state, about half of each executed
notebook's size, and its plain-text fallback reads "0%" in any viewer without widgets. The headless
runner sets ``TRKIT_PROGRESS=text``; with it every trkit bar is plain text, refreshed at most every
``TRKIT_PROGRESS_INTERVAL`` seconds (default 10), so the saved output is a few readable lines. Hugging
Face's own bars (model loading, datasets) are switched off there by ``HF_HUB_DISABLE_PROGRESS_BARS`` /
``HF_DATASETS_DISABLE_PROGRESS_BARS``.
"""

from __future__ import annotations

import os
import sys


def text_mode() -> bool:
    """True when progress should be plain text (headless notebook runs, or TRKIT_PROGRESS=text)."""
    return os.environ.get("TRKIT_PROGRESS", "").lower() == "text"


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, or a plain-text bar on stdout in text mode (see the module docstring)."""
    if text_mode():
        from tqdm.std import tqdm as text_tqdm

        kwargs.setdefault("file", sys.stdout)
        # a caller's shorter interval is for live widgets; saved text keeps to the headless interval
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0), float(os.environ.get("TRKIT_PROGRESS_INTERVAL", "10")))
        kwargs.setdefault("ascii", True)
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("ncols", 100)
        return text_tqdm(*args, **kwargs)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(*args, **kwargs)


HEADLESS_ENV = {"TRKIT_PROGRESS": "text", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                "TQDM_MININTERVAL": "10"}
