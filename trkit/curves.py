"""Training curves: loss, validation bits per character and memory of a run, drawn from its log.

A run's ``log.jsonl`` (:mod:`trkit.train`) holds one record per logged step (``loss``, ``lr``,
``tokens_per_s``, ``memory_gib``) and one per validation (``eval/turkish_bpc``, ``eval/english_bpc``).
:func:`plot_log` draws them side by side for one or several runs (the ``rows`` stage, then the
``adapters`` stage, continue one x axis); :class:`LivePlot` redraws the same figure in place while a
notebook trains (pass it as ``train(config, on_log=live)``). Headless runs (plain-text progress, see
:mod:`trkit.progress`) skip the redraws and show the final figure once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/log.jsonl`` (a line cut by a kill ends the list)."""
    path = Path(run_dir) / "log.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def plot_log(runs: dict[str, Sequence[dict]], title: str = "training"):
    """A figure with loss, validation BPC and memory per step; ``runs``: label -> log records, drawn one
    after another on a shared step axis."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    offset = 0
    for label, records in runs.items():
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        if train:
            axes[0].plot([offset + r["step"] for r in train], [r["loss"] for r in train], label=label)
            axes[2].plot([offset + r["step"] for r in train], [r["memory_gib"] for r in train], label=label)
        for key, style in (("eval/turkish_bpc", "o-"), ("eval/english_bpc", "s--")):
            pts = [(offset + r["step"], r[key]) for r in evals if key in r]
            if pts:
                axes[1].plot(*zip(*pts), style, label=f"{label}: {key[5:-4]}")
        offset += max([r["step"] for r in records] or [0])
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="nats per token")
    axes[1].set(title="validation bits per character", xlabel="optimizer step", ylabel="bits / char (lower is better)")
    axes[2].set(title="memory", xlabel="optimizer step", ylabel="GiB (GPU peak / CPU RSS)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class LivePlot:
    """``on_log`` callback that redraws :func:`plot_log` in place every ``every`` records (live notebooks only)."""

    def __init__(self, label: str, earlier: dict[str, Sequence[dict]] | None = None, every: int = 10):
        from trkit.progress import text_mode

        self.label, self.earlier, self.every = label, dict(earlier or {}), max(1, every)
        self.records: list[dict] = []
        self.live = not text_mode()
        self._handle = None

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if self.live and (len(self.records) % self.every == 0 or any(k.startswith("eval/") for k in record)):
            self.draw()

    def draw(self):
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig = plot_log({**self.earlier, self.label: self.records}, title=f"{self.label} (live)")
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)
