"""Checkpoint files: safetensors read and written tensor by tensor, checked before they are trusted.

What it does. Every stage that edits or writes a model checkpoint (``trkit.embeddings`` resizes the
embedding matrices, ``trkit.train --merge`` writes a merged model) goes through this module, so a
checkpoint is read, verified and written one way:

* the safetensors format is ``u64 n | n bytes of JSON header | raw tensor data``; the header gives
  each tensor's dtype, shape and ``data_offsets`` into the data. :func:`verify_safetensors` checks
  that the header parses, that every tensor's byte range matches its shape and dtype and lies inside
  the file, and that the file is exactly as long as its header says, so a truncated download (or a
  disconnect mid-copy) is found in milliseconds, without reading the data;
* :func:`verify_checkpoint` does that for every shard a checkpoint's index names (and checks the
  recorded sizes and hashes of a trkit-written checkpoint) before any of it is linked, copied or
  loaded; a bad shard is an error that names the file and says "re-download";
* :func:`read_rows_into` reads one matrix straight into a larger new tensor with ``readinto`` (peak
  RAM: the new matrix), :func:`write_safetensors_streaming` writes a file tensor by tensor (byte
  ranges copied from another file, or tensors produced one at a time), atomically;
* :func:`write_sharded_checkpoint` writes a whole model as shards of at most ``max_shard_bytes`` with
  the Hugging Face index, one tensor in memory at a time (a merged Qwen3-8B on a free Colab).

Format: https://github.com/huggingface/safetensors (the file layout above); the sharded layout and
``model.safetensors.index.json`` (``metadata.total_size``, ``metadata.total_parameters``,
``weight_map``) are what ``transformers`` writes and reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from trkit.artifacts import MANIFEST_NAME, atomic_path, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ST_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
ST_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                   "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not what its index says. The message names the file."""


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged ({why}): re-download the checkpoint (or re-run the stage that wrote it)")


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise _damaged(path, f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-download it") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    return header, 8 + n


def verify_safetensors(path: str | os.PathLike) -> dict:
    """Check a safetensors file's structure without reading its data; return its header.

    Every tensor's ``data_offsets`` must match ``prod(shape) * itemsize``, lie inside the data and not
    overlap another's, and the file must end exactly where the last tensor does.
    """
    path = Path(path)
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in info["data_offsets"])
            nbytes = ST_ITEM_BYTES[info["dtype"]] * math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name!r} has a malformed header entry") from None
        if b - a != nbytes or a < 0:
            raise _damaged(path, f"tensor {name!r}: {b - a} bytes recorded, its shape and dtype need {nbytes}")
        spans.append((a, b, name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a < end:
            raise _damaged(path, f"tensor {name!r} overlaps the previous tensor")
        end = b
    if start + end != size:
        what = "truncated" if start + end > size else "longer than its header says"
        raise _damaged(path, f"{what}: {size} bytes on disk, the header needs {start + end}")
    return header


def weight_map(src: str | os.PathLike) -> tuple[dict[str, str], dict | None]:
    """``(tensor name -> shard file, the index dict or None)`` of a checkpoint directory."""
    src = Path(src)
    index = src / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            return dict(data["weight_map"]), data
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise _damaged(index, "not a valid safetensors index") from None
    header, _ = read_safetensors_header(src / SINGLE_NAME)
    return {k: SINGLE_NAME for k in header if k != "__metadata__"}, None


def verify_checkpoint(src: str | os.PathLike, *, hashes: bool = False) -> dict[str, dict]:
    """Check every safetensors file of checkpoint ``src`` before it is used; return ``{shard: header}``.

    Always: the index (if any) parses, every shard it names exists and :func:`verify_safetensors`
    passes, and every indexed tensor is in its shard. For a trkit-written checkpoint (it has a
    manifest), every listed file must exist with its recorded size, and with ``hashes=True`` its
    recorded sha256 (reads everything: minutes for an 8B model on Drive).
    """
    src = Path(src)
    manifest_path = src / MANIFEST_NAME
    if manifest_path.is_file():
        from trkit.artifacts import read_manifest

        manifest = read_manifest(src, verify=hashes)
        for rel, size in (manifest.get("sizes") or {}).items():
            f = src / rel
            if not f.exists():
                raise CheckpointError(f"{f} is listed in {manifest_path} but missing: re-run the stage that wrote {src}")
            if f.stat().st_size != size:
                raise _damaged(f, f"{f.stat().st_size} bytes, the manifest recorded {size}")
    wmap, _ = weight_map(src)
    headers: dict[str, dict] = {}
    for shard in sorted(set(wmap.values())):
        headers[shard] = verify_safetensors(src / shard)
    for name, shard in wmap.items():
        if name not in headers[shard]:
            raise _damaged(src / shard, f"the index puts tensor {name!r} in it, but the file does not hold it")
    return headers


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint directory: a path, an offline alias ('smollm2', 'qwen3-tiny') or a hub snapshot.

    Refuses what trkit cannot use with a message that says what to do: a path that does not exist, a
    directory without ``config.json``, or weights only as pickles (``pytorch_model.bin``).
    """
    text = str(name_or_path)
    p = Path(text)
    if not p.exists():
        from trkit.assets import resolve_model

        p = Path(resolve_model(text))
    if not p.exists():
        looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1] or text.count("/") != 1
        if looks_local:
            raise FileNotFoundError(f"{text}: no such model directory (and not a hub name of the form 'owner/model')")
        from huggingface_hub import snapshot_download

        try:
            p = Path(snapshot_download(text, allow_patterns=[
                "*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "*.model"]))
        except Exception as exc:  # offline, gated, missing: one line that says which
            raise FileNotFoundError(f"{text}: could not download it from the Hugging Face hub "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory: pass a Hugging Face model directory or hub name")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json: pass a Hugging Face model directory or hub name")
    if not ((p / SINGLE_NAME).is_file() or (p / INDEX_NAME).is_file()):
        pickles = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (it holds {', '.join(pickles[:3])}: pickle files, which trkit never loads; convert them with "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` in a trusted environment)"
                if pickles else "")
        raise FileNotFoundError(f"{p} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); safetensors is "
                                f"required{hint}")
    return p


def read_rows_into(path: str | os.PathLike, key: str, rows: int) -> "torch.Tensor":
    """A ``(rows, hidden)`` matrix whose first rows are tensor ``key`` of a safetensors file, read with
    ``readinto`` straight into the new tensor's memory (peak RAM: the new matrix, nothing else)."""
    import torch

    path = Path(path)
    header, start = read_safetensors_header(path)
    if key not in header:
        raise _damaged(path, f"it holds no tensor {key!r}")
    info = header[key]
    old_rows, hidden = info["shape"]
    a, b = info["data_offsets"]
    new = torch.empty(rows, hidden, dtype=getattr(torch, ST_TORCH_DTYPES[info["dtype"]]))
    target = new[:old_rows].view(-1).view(torch.uint8).numpy()
    if len(target) != b - a:
        raise _damaged(path, f"tensor {key} holds {b - a} bytes, its shape says {len(target)}")
    with open(path, "rb") as f:
        f.seek(start + a)
        view = memoryview(target)
        done = 0
        while done < len(view):
            n = f.readinto(view[done : done + (16 << 20)])
            if not n:
                raise _damaged(path, f"truncated inside tensor {key}")
            done += n
    return new


def read_tensor(path: str | os.PathLike, key: str) -> "torch.Tensor":
    """One tensor of a safetensors file (2-D: a plain read into fresh memory, no memory map)."""
    header, _ = read_safetensors_header(path)
    if key not in header:
        raise _damaged(Path(path), f"it holds no tensor {key!r}")
    shape = header[key]["shape"]
    if len(shape) == 2:
        return read_rows_into(path, key, shape[0])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).clone()


def st_dtype(t: "torch.Tensor") -> str:
    """The safetensors dtype code of a tensor (``BF16``, ``F32``, ...)."""
    import torch

    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if t.dtype not in codes:
        raise ValueError(f"dtype {t.dtype} cannot be written to safetensors by trkit")
    return codes[t.dtype]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_safetensors_streaming(path: str | os.PathLike, entries: list[tuple[str, str, list[int], Any]],
                                metadata: dict | None, copy_chunk: int = 16 << 20) -> None:
    """Write a safetensors file one tensor at a time, atomically (temp file, then rename).

    ``entries``: ``(name, st_dtype, shape, source)`` in file order, ``source`` either
    ``(src_path, start, end)`` (bytes copied from another safetensors file, never held whole in
    memory) or a zero-argument callable returning a contiguous CPU tensor, called when its turn comes
    (so only one new matrix exists at a time).
    """
    import torch

    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for name, dtype, shape, source in entries:
        nbytes = ST_ITEM_BYTES[dtype] * math.prod(shape)
        if isinstance(source, tuple) and source[2] - source[1] != nbytes:
            raise ValueError(f"{name}: source holds {source[2] - source[1]} bytes, shape says {nbytes}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for (name, dtype, shape, source), nbytes in zip(entries, sizes):
            if isinstance(source, tuple):
                src, start, end = source
                with open(src, "rb") as f:
                    f.seek(start)
                    left = end - start
                    while left:
                        block = f.read(min(copy_chunk, left))
                        if not block:
                            raise _damaged(Path(src), f"truncated inside tensor {name}")
                        out.write(block)
                        left -= len(block)
            else:
                tensor = source()
                if list(tensor.shape) != list(shape) or st_dtype(tensor) != dtype:
                    raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
                flat = tensor.detach().contiguous().view(-1).cpu()
                step = max(1, copy_chunk // tensor.element_size())
                for lo in range(0, flat.numel(), step):
                    out.write(flat[lo : lo + step].view(torch.uint8).numpy().data)
                del tensor, flat
            out.flush()


def write_sharded_checkpoint(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, Callable[[], "torch.Tensor"], str, list[int]]],
    *,
    max_shard_bytes: int = 4 << 30,
    metadata: dict | None = None,
) -> dict:
    """Write a model as ``model-0000k-of-0000n.safetensors`` shards plus the index (or one
    ``model.safetensors`` when it fits one shard), holding one tensor in memory at a time.

    ``tensors``: ``(name, produce, st_dtype, shape)`` in the order to write; ``produce()`` returns the
    tensor when its turn comes. Files go into ``directory`` (a staging directory of
    :func:`trkit.artifacts.atomic_directory`). Returns the index dict.
    """
    directory = Path(directory)
    items = list(tensors)
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = ST_ITEM_BYTES[item[2]] * math.prod(item[3])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    total = sum(ST_ITEM_BYTES[d] * math.prod(s) for _, _, d, s in items)
    params = sum(math.prod(s) for _, _, _, s in items)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    wmap = {}
    for name, shard in zip(names, shards):
        write_safetensors_streaming(directory / name, [(n, d, s, produce) for n, produce, d, s in shard], meta)
        wmap.update({n: name for n, _, _, _ in shard})
    index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": dict(sorted(wmap.items()))}
    if len(shards) > 1:
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike, link: bool = True) -> str:
    """Hard-link ``src`` to ``dst`` when allowed and possible (same filesystem), else copy; says which."""
    src, dst = Path(src), Path(dst)
    if link:
        try:
            os.link(src.resolve(), dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def file_sizes(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, int]:
    """``{name: size in bytes}`` for the manifest's cheap completeness check."""
    directory = Path(directory)
    return {n: (directory / n).stat().st_size for n in names}


def sha256_files(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    directory = Path(directory)
    return {n: sha256_file(directory / n) for n in names}
