"""Turkish tasks of EleutherAI's lm-evaluation-harness, run on the model object trkit already loaded.

What it does. :func:`run_tasks` hands a loaded model (base, extended, 4-bit, or a ``PeftModel`` with its
adapter) and its tokenizer to lm-eval's Hugging Face model class
(``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``), so the harness scores
exactly the weights every other trkit measurement scored, and returns ``acc`` and ``acc_norm`` per task.
Multiple-choice tasks in lm-eval score each choice by its summed log-likelihood given the context
(``acc``: argmax of the sum; ``acc_norm``: argmax of the sum divided by the choice's length in
characters; Gao et al., "A framework for few-shot language model evaluation", EleutherAI 2021-).

Default Turkish tasks (:data:`TASKS`): ``belebele_tur_Latn`` (Bandarkar et al. 2023, reading
comprehension), ``xcopa_tr`` (Ponti et al. 2020, causal commonsense), ``xnli_tr`` (Conneau et al.
2018, entailment), ``global_mmlu_full_tr`` (Singh et al. 2024, MMLU in Turkish); ``turkishmmlu``
(Yüksel et al. 2024) is added when the Hugging Face token can read its dataset
(:func:`has_dataset_access`). They download their data from the hub, so they run on Colab, not offline;
a task directory of one's own (``include_path``: lm-eval task YAMLs over local files) runs anywhere,
which is how the tests exercise this path.

lm-eval is an optional extra (``pip install 'trkit[eval]'``): without it :func:`require` raises a
one-line message saying what to install.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

TASKS = ("belebele_tur_Latn", "xcopa_tr", "xnli_tr", "global_mmlu_full_tr")
GATED_TASKS = {"turkishmmlu": "AYueksel/TurkishMMLU"}  # task -> the hub dataset it needs access to
INSTALL_HINT = "pip install 'trkit[eval]' (or: pip install 'lm-eval>=0.4.13')"


def available() -> bool:
    """True when lm-evaluation-harness is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def require():
    """The ``lm_eval`` module, or a RuntimeError with one line saying what to install."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"lm-evaluation-harness is not installed ({exc.name or 'lm_eval'} missing): "
                           f"{INSTALL_HINT}") from None
    return lm_eval


def has_dataset_access(repo_id: str) -> bool:
    """Whether the Hugging Face token (``trkit.colab.hf_token``) can read the dataset ``repo_id``;
    False offline, for gated datasets without access, and on any hub error."""
    try:
        from huggingface_hub import HfApi

        from trkit.colab import hf_token

        HfApi().auth_check(repo_id, repo_type="dataset", token=hf_token())
        return True
    except Exception as exc:  # offline, gated, not found: all mean "cannot run it"
        log.info("no access to dataset %s (%s): skipping its task", repo_id, type(exc).__name__)
        return False


def default_tasks(check_gated: bool = True) -> list[str]:
    """:data:`TASKS`, plus each gated task whose dataset the token can read."""
    tasks = list(TASKS)
    if check_gated:
        tasks += [task for task, repo in GATED_TASKS.items() if has_dataset_access(repo)]
    return tasks


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` over its built-in tasks and/or a directory of task YAMLs."""
    require()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"lm-eval task directory {include_path} does not exist: pass a directory of task YAMLs")
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """Refuse task names lm-eval does not know, before any model runs."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ValueError("unknown lm-eval task(s): " + "; ".join(
            f"{t}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            + ". `lm_eval ls tasks` lists them")


def _metrics(entry: dict) -> dict:
    def get(name):
        v = entry.get(f"{name},none")
        return float(v) if isinstance(v, (int, float)) else None

    return {"acc": get("acc"), "acc_stderr": get("acc_stderr"), "acc_norm": get("acc_norm"),
            "acc_norm_stderr": get("acc_norm_stderr")}


def run_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | float | None = None, batch_size: int = 8,
              num_fewshot: int | None = None, include_path: str | Path | None = None, include_defaults: bool = True,
              manager=None, seed: int = 0) -> dict[str, Any]:
    """``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}}`` for ``model``.

    ``limit`` caps the documents per task (lm-eval's ``limit``: an int, or a fraction < 1). A group
    task (``global_mmlu_full_tr``) reports lm-eval's aggregate over its subtasks (``acc`` only, as
    the group defines it).
    """
    lm_eval = require()
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise ValueError("no lm-eval tasks given")
    manager = manager or task_manager(include_path, include_defaults)
    check_tasks(tasks, manager)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warning that a model object (not a name) was passed is what we mean to do
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    was_training = model.training
    model.eval()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, verbosity="WARNING")
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    for task in tasks:
        entry = (res.get("groups") or {}).get(task) or res["results"].get(task)
        if entry is None:
            raise RuntimeError(f"lm-eval returned no result for task {task!r}")
        metrics = _metrics(entry)
        n = (res.get("n-samples") or {}).get(task) or {}
        metrics["samples"] = n.get("effective")
        if metrics["samples"] is None:  # a group: the sum over its subtasks
            subtasks = [k for k in (res.get("n-samples") or {}) if k != task and k.startswith(task)]
            metrics["samples"] = sum(res["n-samples"][k].get("effective", 0) for k in subtasks) or None
        out[task] = metrics
    return out
