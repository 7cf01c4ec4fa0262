"""Artifacts on disk: atomic writes, sha256 hashes and the small JSON manifest every stage writes.

Every stage reads the previous stage's directory and writes its own. A directory is only
trusted if its ``trkit_manifest.json`` exists and the files it lists still hash to what was
recorded, so a half-written or truncated file (a Colab disconnect mid-save) is detected
instead of silently used. Files are written to a temporary name in the same directory and
renamed into place (``os.replace`` is atomic on POSIX and on Google Drive's FUSE mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a whole output directory under a temporary name, then rename it into place.

    Refuses an existing ``out_dir`` unless ``overwrite`` (then the old one is replaced only
    after the new one is complete). The caller writes into the yielded path.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; choose another --out or pass overwrite=True (--overwrite) to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{int(time.time())}")
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
    """Write ``trkit_manifest.json`` in ``directory``: stage, time, trkit version, file hashes, fields."""
    from trkit import __version__

    directory = Path(directory)
    manifest = {
        "stage": stage,
        "trkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": hash_directory_files(directory),
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
    manifest = json.loads(path.read_text(encoding="utf-8"))
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
