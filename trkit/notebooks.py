"""Run the notebooks headless: jupytext turns the ``.py`` (percent format, the source of truth) into a
notebook, papermill injects the parameters and executes it, and the executed ``.ipynb`` is written
to the output folder. The first failing cell stops the run with the cell named.

Also checks that each ``notebooks/NN_name.py`` and its paired ``.ipynb`` hold the same cells.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def notebooks_dir() -> Path:
    """``notebooks/`` of the checkout this package runs from (or ``$TRKIT_NOTEBOOKS``)."""
    env = os.environ.get("TRKIT_NOTEBOOKS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "notebooks"
    if here.is_dir():
        return here
    return Path.cwd() / "notebooks"


def list_notebooks(directory: Path | None = None) -> list[str]:
    directory = directory or notebooks_dir()
    return sorted(p.stem for p in directory.glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def check_pairs(directory: Path | None = None) -> list[str]:
    """Problems with the ``.py``/``.ipynb`` pairing, one line each (empty list = all in sync)."""
    import jupytext

    directory = directory or notebooks_dir()
    problems = []
    for name in list_notebooks(directory):
        py, ipynb = directory / f"{name}.py", directory / f"{name}.ipynb"
        if not ipynb.exists():
            problems.append(f"{name}: no paired {ipynb.name} (run: jupytext --sync notebooks/{name}.py)")
            continue
        a, b = _cells(jupytext.read(py)), _cells(jupytext.read(ipynb))
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(f"{name}: .py and .ipynb differ from cell {first} on "
                            f"(run: jupytext --sync notebooks/{name}.py)")
        if not any("parameters" in c.metadata.get("tags", []) for c in jupytext.read(py).cells):
            problems.append(f"{name}: no cell tagged 'parameters' (papermill needs one)")
    return problems


def run_notebook(name: str, out_dir: Path, parameters: dict, directory: Path | None = None,
                 timeout: int | None = None) -> Path:
    """Execute one notebook; return the executed ``.ipynb``. Raises RuntimeError naming the failing cell."""
    import jupytext
    import nbformat
    import papermill as pm

    directory = directory or notebooks_dir()
    src = directory / f"{name}.py"
    if not src.exists():
        raise FileNotFoundError(f"no notebook {src}; available: {', '.join(list_notebooks(directory))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    staged = out_dir / f".{name}.input.ipynb"
    nbformat.write(nb, staged)
    executed = out_dir / f"{name}.ipynb"
    from trkit.progress import HEADLESS_ENV

    saved_env = {k: os.environ.get(k) for k in HEADLESS_ENV}
    os.environ.update(HEADLESS_ENV)  # the kernel inherits it: plain-text progress, no widget state saved
    try:
        pm.execute_notebook(
            str(staged), str(executed), parameters=parameters, kernel_name="python3",
            cwd=str(out_dir), progress_bar=False, execution_timeout=timeout, **_kernel_transport(),
        )
    except pm.PapermillExecutionError as exc:
        number, heading = _locate_failure(executed) if executed.exists() else (exc.exec_count, "")
        raise RuntimeError(
            f"{name}: code cell {number} failed{(' (in step: ' + heading + ')') if heading else ''}: "
            f"{exc.ename}: {exc.evalue}\n  executed notebook with the traceback: {executed}"
        ) from None
    finally:
        staged.unlink(missing_ok=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return executed


def _kernel_transport() -> dict:
    """Talk to the kernel over Unix sockets where possible: ipykernel warns on every start ("Kernel is
    running over TCP without encryption ...") and the IPC transport it recommends needs no open port.
    The sockets get a unique name in Jupyter's runtime directory (jupyter_client would otherwise use a
    relative ``kernel-ipc-N`` in the notebook's working directory, shared by concurrent runs); Unix
    socket paths are limited to ~107 bytes, so a long runtime path keeps TCP."""
    if os.name != "posix":
        return {}
    import uuid

    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets.config import Config

    runtime = Path(jupyter_runtime_dir())
    ip = runtime / f"trkit-kernel-{uuid.uuid4().hex[:12]}"
    if len(str(ip)) > 90:  # + "-N" per socket must stay under the limit
        return {}
    runtime.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(ip)
    return {"config": config}


def _locate_failure(executed: Path) -> tuple[int, str]:
    """(number of the failing code cell as the user counts them in the .py, the step heading above it)."""
    import nbformat

    number, heading = 0, ""
    for cell in nbformat.read(executed, as_version=4).cells:
        tags = cell.metadata.get("tags", [])
        if "papermill-error-cell-tag" in tags or "injected-parameters" in tags:
            continue  # papermill's own cells, not the user's
        if cell.cell_type == "markdown":
            heading = next((ln.lstrip("# ").strip() for ln in cell.source.splitlines() if ln.startswith("#")), heading)
        elif cell.cell_type == "code":
            number += 1
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                return number, heading
    return number, heading


def parameter_names(name: str, directory: Path | None = None) -> set[str]:
    """The names a notebook's ``parameters`` cell assigns (what papermill may set without a warning)."""
    import ast

    import jupytext

    nb = jupytext.read((directory or notebooks_dir()) / f"{name}.py")
    names = set()
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def run_notebooks(names: list[str] | None, profile: str, out: str | os.PathLike,
                  extra: dict | None = None) -> list[Path]:
    """Run ``names`` (default: all, in order) on ``profile``; each writes its artifacts into
    ``<out>/work``, the executed notebooks into ``<out>``, and 05_eval its report into ``<out>/report``."""
    out_dir = Path(out).resolve()
    names = names or list_notebooks()
    if not names:
        raise FileNotFoundError(f"no notebooks found in {notebooks_dir()}")
    workdir = out_dir / "work"
    params = {"profile": profile, "workdir": str(workdir), **(extra or {})}
    layout = {"report_dir": str(out_dir / "report")}  # given only to notebooks that declare it
    done = []
    for name in names:
        t0 = time.time()
        print(f"[trkit] running {name} (profile={profile}) ...", flush=True)
        declared = parameter_names(name)
        path = run_notebook(name, out_dir, {**{k: v for k, v in layout.items() if k in declared}, **params})
        print(f"[trkit] {name} ok in {time.time() - t0:.0f}s -> {path}", flush=True)
        done.append(path)
    return done


def _parse_params(items: list[str]) -> dict:
    import json

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-p expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    run = sub.add_parser("run", help="execute notebooks headless (all by default, in order)")
    run.add_argument("names", nargs="*", help="notebook names, e.g. 00_setup 01_vocab (default: all)")
    run.add_argument("--profile", default="cpu", help="hardware profile passed to each notebook (default: cpu)")
    run.add_argument("--out", default="runs/demo", help="folder for executed notebooks and their artifacts")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="extra papermill parameter (JSON value or string); repeatable")
    sub.add_parser("list", help="list the notebooks")
    sub.add_parser("check", help="check every .py/.ipynb pair is in sync")


def run_cli(args) -> int:
    if args.action == "list":
        print("\n".join(list_notebooks()))
        return 0
    if args.action == "check":
        problems = check_pairs()
        print("\n".join(problems) if problems else "all notebook pairs in sync")
        return 1 if problems else 0
    try:
        run_notebooks(args.names, args.profile, args.out, _parse_params(args.param))
    except RuntimeError as exc:
        print(f"[trkit] FAILED {exc}", file=sys.stderr)
        return 1
    return 0
