"""Artifacts on disk: atomic writes, sha256 hashes and the small JSON manifest every stage writes.

Every stage reads the previous stage's directory and writes its own. A directory is only
trusted if its ``trkit_manifest.json`` exists and the files it lists still hash to what was
recorded, so a half-written or truncated file (a Colab disconnect mid-save) is detected
instead of silently used. Files are written to a temporary name in the same directory and
renamed into place (``os.replace`` is atomic on POSIX and on Google Drive's FUSE mount).
Temporary names carry the writer's ``<host>-<pid>``, so the next write of the same path removes what
a killed writer left behind (an 8B checkpoint's ``.partial`` directory is a checkpoint's size on Drive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

MANIFEST_NAME = "trkit_manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (no whole-file read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tag() -> str:
    """``<host>-<pid>``: who owns a temporary name, so a later run can tell a dead writer's leftovers."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or restricted: the module's import time is close enough
        return _IMPORTED


_IMPORTED = time.time()
_TAG_RE = re.compile(r"^(?P<host>[^.]+)-(?P<pid>\d+)$")


def _is_stale(tag: str, path: Path) -> bool:
    """A leftover of a writer that is gone: same host and its pid is dead, or another host's and older
    than this process (a Colab runtime that was recycled while writing to Drive)."""
    m = _TAG_RE.match(tag)
    if not m:
        return False
    host, pid = m.group("host"), int(m.group("pid"))
    if host == socket.gethostname().replace(".", "_"):
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return path.stat().st_mtime < _process_start()
    except FileNotFoundError:
        return False


_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+?)\.(?P<tag>[^.]+-\d+)\.[^/]*(?:partial|tmp|old)$")


def sweep_stale(parent: str | os.PathLike, name: str | None) -> list[Path]:
    """Remove what killed writers of ``parent/name`` left behind (``.name.<host>-<pid>.*.partial`` dirs,
    ``.tmp`` files and ``.old`` dirs; every name when ``name`` is None); returns what was removed.
    Called at the start of every write."""
    parent = Path(parent)
    removed = []
    try:
        entries = list(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _LEFTOVER_RE.match(entry.name)
        if not m or (name is not None and not entry.name.startswith(f".{name}.{m.group('tag')}.")):
            continue
        if _is_stale(m.group("tag"), entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. A temporary file
    left by a killed process is removed by the next write of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact gets ordinary permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    require_manifest: bool = True,
) -> Iterator[Path]:
    """Build a whole output directory under a temporary name, then rename it into place.

    The checks of :func:`trkit.options.check_output` run first (and a stage should already have run
    them before its expensive work): ``out_dir`` must not be, contain or lie inside any of ``inputs``;
    an existing ``out_dir`` needs ``overwrite`` and, with ``require_manifest``, must be a trkit output
    (it is replaced only after the new one is complete). Leftovers of killed earlier writes of the same
    directory are swept first. The caller writes into the yielded path.
    """
    from trkit.options import check_output

    out_dir = Path(out_dir)
    check_output(out_dir, inputs=inputs, overwrite=overwrite, require_manifest=require_manifest)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_tag()}.", suffix=".partial", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if out_dir.exists():
            check_output(out_dir, inputs=inputs, overwrite=overwrite, require_manifest=require_manifest)
            old = out_dir.with_name(f".{out_dir.name}.{_tag()}.{int(time.time())}.old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_directory_files(directory: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    """sha256 of every regular file below ``directory`` (relative posix path -> hash)."""
    directory = Path(directory)
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in exclude and not p.name.startswith("."):
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def write_manifest(directory: str | os.PathLike, stage: str, **fields: Any) -> dict:
    """Write ``trkit_manifest.json`` in ``directory``: stage, time, trkit version, fields, and every file's
    sha256 and size (sizes allow a cheap completeness check of big checkpoints, hashes the full one)."""
    from trkit import __version__

    directory = Path(directory)
    files = hash_directory_files(directory)
    mode = 0o666 & ~_umask()
    for rel in files:  # some writers (safetensors, mkstemp) create 0600 files: artifacts get ordinary permissions
        with contextlib.suppress(OSError):
            os.chmod(directory / rel, mode)
    manifest = {
        "stage": stage,
        "trkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": files,
        "sizes": {rel: (directory / rel).stat().st_size for rel in files},
    }
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict:
    """Read a stage directory's manifest; with ``verify`` check every listed file's hash.

    Raises a ValueError that names the damaged file and says what to do.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: it was not written by trkit, or its write did not finish. "
            "Re-run the stage that produces it."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): the directory's write did not finish or the file was "
                         "changed; re-run the stage that produced it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a trkit manifest (a JSON object); re-run the stage that produced it")
    if verify:
        for rel, expected in manifest.get("files", {}).items():
            f = directory / rel
            if not f.exists():
                raise ValueError(f"{f} is listed in {path} but missing: the directory is incomplete; re-run the stage.")
            actual = sha256_file(f)
            if actual != expected:
                raise ValueError(
                    f"{f} does not match its recorded sha256 ({actual[:12]}… != {expected[:12]}…): "
                    "the file was changed or only partly written; re-run the stage that produced it."
                )
    return manifest
