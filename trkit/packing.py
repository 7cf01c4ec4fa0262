"""Training text: a deterministic document stream, tokenised and packed into fixed-length blocks.

What it does. The training stage (:mod:`trkit.train`) and the teacher cache of distillation
(:mod:`trkit.distill`) must read **the same documents in the same order**: :func:`document_stream`
gives them, from the offline default corpus, a ``trkit corpus`` directory, text / JSONL / parquet
files (through ``datasets``) or a hub dataset (streamed), shuffled once by ``seed``, with a sha256 of
the whole ordered stream so a later stage can refuse a different one.

Packing (continued pretraining, ``format="text"``): every document is prefixed with the document
separator (``<|endoftext|>``: what the model saw between documents in pretraining, the same id for a
base tokenizer and its extension), the token stream is cut into blocks of ``seq_len`` tokens, and a
block's positions all carry labels (Hugging Face convention: position t predicts token t+1, so each
block predicts ``seq_len - 1`` tokens). The short remainder at the end is dropped and counted.
Attention is not masked between documents inside a block (as in pretraining; the separator tells the
model a new document starts).

For every token the block also records its document (index in the stream) and the UTF-8 **byte**
offset where it ends in that document. Byte-level BPE tokens concatenate to exactly the document's
UTF-8 bytes, so these offsets are exact even for tokens that hold half a character (``ğ`` is two
bytes), and because a vocabulary extension only merges, every student token boundary is also a
teacher token boundary: distillation aligns the two tokenisations by (document, byte offset).

Instruction data (``format="chat"``): each conversation (``messages``, or instruction / input /
response columns) is rendered with the tokenizer's chat template; only tokens inside assistant turns
carry labels. Conversations are packed whole (never split across blocks; longer ones are truncated
and counted), the rest of a block is padding without labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
FORMATS = ("text", "chat")


@dataclass
class Documents:
    """An ordered document stream and what identifies it."""

    texts: list[Any]  # str for text, list of {"role", "content"} for chat
    source: str  # what was asked for ('default', paths, a hub name)
    sha256: str  # of the ordered stream (json of each document, newline-joined)
    kind: str = "text"
    skipped: int = 0  # empty or malformed records left out

    def __len__(self) -> int:
        return len(self.texts)


def _stream_hash(texts: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(json.dumps(t, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _read_text_lines(path: Path) -> list[str]:
    from trkit.evaluation import read_documents

    return read_documents(path)


def _records(paths: Sequence[Path], text_field: str, kind: str) -> tuple[list[Any], int]:
    """Documents (text) or conversations (chat) from local files, in file order."""
    out: list[Any] = []
    skipped = 0
    for path in paths:
        name = path.name.lower().removesuffix(".gz")
        if kind == "text" and name.endswith(TEXT_SUFFIXES) and not name.endswith(".gz"):
            out.extend(_read_text_lines(path))
            continue
        from datasets import load_dataset

        if name.endswith(TEXT_SUFFIXES):
            ds = load_dataset("text", data_files=str(path), split="train")
        elif name.endswith(JSON_SUFFIXES):
            ds = load_dataset("json", data_files=str(path), split="train")
        elif name.endswith(PARQUET_SUFFIXES):
            ds = load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise ValueError(f"{path}: unknown file type; pass .txt (one document per line), .jsonl, .json or .parquet "
                             "(optionally .gz)")
        for row in ds:
            rec = _record(row, text_field, kind)
            if rec is None:
                skipped += 1
            else:
                out.append(rec)
    return out, skipped


def _record(row: dict, text_field: str, kind: str) -> Any:
    if kind == "text":
        value = row.get(text_field)
        return value.lstrip("\ufeff") if isinstance(value, str) and value.strip() else None
    return conversation(row)


def conversation(row: dict) -> list[dict] | None:
    """A conversation from a record: ``messages`` (role/content dicts), or instruction (+ input) / response
    (also the common ``output``, ``answer``, ``prompt``/``completion`` names). None if it has no assistant turn."""
    msgs = row.get("messages") or row.get("conversations")
    if isinstance(msgs, list) and msgs:
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                return None
            role = m.get("role") or {"human": "user", "gpt": "assistant"}.get(m.get("from", ""), m.get("from"))
            content = m.get("content", m.get("value"))
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                return None
            out.append({"role": role, "content": content})
        return out if any(m["role"] == "assistant" for m in out) else None
    prompt = next((row[k] for k in ("instruction", "prompt", "question") if isinstance(row.get(k), str)), None)
    answer = next((row[k] for k in ("response", "output", "answer", "completion") if isinstance(row.get(k), str)), None)
    if not prompt or not answer:
        return None
    extra = row.get("input")
    user = f"{prompt}\n\n{extra}" if isinstance(extra, str) and extra.strip() else prompt
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def document_stream(corpus: str | os.PathLike | Sequence[str | os.PathLike], *, seed: int = 0, kind: str = "text",
                    split: str = "train", text_field: str = "text", max_documents: int | None = None) -> Documents:
    """The ordered documents of ``corpus`` (see the module doc), shuffled once with ``seed``.

    ``corpus``: ``"default"`` (the offline training split), a ``trkit corpus`` directory (its
    ``split``), one or more files, or a hub dataset ``name`` / ``name:config`` (streamed, needs the
    hub; at most ``max_documents``).
    """
    if kind not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {kind!r}")
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items:
        raise ValueError("no corpus given: pass 'default', a trkit corpus directory, files, or a hub dataset name")
    texts: list[Any] = []
    skipped = 0
    if len(items) == 1 and str(items[0]) == "default":
        if kind != "text":
            raise ValueError("the offline default corpus is running text: use --format text, or pass a JSONL of conversations")
        from trkit import assets

        files = assets.corpus_files() if split == "train" else assets.validation_files()
        for name in sorted(files):
            texts.extend(_read_text_lines(files[name]))
    else:
        paths = [Path(str(i)) for i in items]
        if all(p.exists() for p in paths):
            for p in paths:
                if p.is_dir():
                    texts.extend(_corpus_dir(p, split, kind))
                else:
                    got, bad = _records([p], text_field, kind)
                    texts.extend(got)
                    skipped += bad
        elif len(items) == 1 and "/" in str(items[0]) and not str(items[0]).startswith((".", "/")):
            got, skipped = _hub(str(items[0]), split, text_field, kind, max_documents)
            texts.extend(got)
        else:
            missing = [str(p) for p in paths if not p.exists()]
            raise FileNotFoundError(f"corpus path(s) not found: {', '.join(missing)}; pass 'default', a trkit corpus "
                                    "directory, existing files, or a hub dataset name 'owner/name[:config]'")
    if max_documents is not None and len(texts) > max_documents:
        texts = texts[:max_documents]
    order = np.random.default_rng(seed).permutation(len(texts))
    texts = [texts[i] for i in order]
    return Documents(texts=texts, source=",".join(str(i) for i in items), sha256=_stream_hash(texts), kind=kind,
                     skipped=skipped)


def _corpus_dir(path: Path, split: str, kind: str) -> list[Any]:
    from trkit.artifacts import read_manifest

    if not (path / "trkit_manifest.json").is_file():
        raise ValueError(f"{path} is a directory but not a `trkit corpus` output (no trkit_manifest.json); pass "
                         "files, or prepare it with `python -m trkit corpus --input ... --out DIR`")
    manifest = read_manifest(path, verify=False)
    if manifest.get("stage") != "corpus":
        raise ValueError(f"{path} was written by `trkit {manifest.get('stage')}`, not `trkit corpus`")
    if kind != "text":
        raise ValueError("a trkit corpus directory is running text: use --format text")
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if split not in ds:
        return []
    return [t for t in ds[split]["text"] if t and t.strip()]


def _hub(name: str, split: str, text_field: str, kind: str, limit: int | None) -> tuple[list[Any], int]:
    from datasets import load_dataset

    from trkit.colab import hf_token

    repo, _, config = name.partition(":")
    ds = load_dataset(repo, config or None, split=split, streaming=True, token=hf_token())
    out, skipped = [], 0
    for row in ds:
        rec = _record(row, text_field, kind)
        if rec is None:
            skipped += 1
            continue
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out, skipped


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass
class Packed:
    """Blocks of ``seq_len`` tokens with labels and, per token, its document and end byte offset."""

    input_ids: np.ndarray  # (n_blocks, seq_len) int32
    labels: np.ndarray  # (n_blocks, seq_len) int32, -100 = no loss
    attention_mask: np.ndarray  # (n_blocks, seq_len) int8
    doc: np.ndarray  # (n_blocks, seq_len) int32: document index in the stream, -1 for padding
    end_byte: np.ndarray  # (n_blocks, seq_len) int32: UTF-8 byte offset in the document where the token ends
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def label_count(self, index: Sequence[int]) -> int:
        """Labelled next-token positions of blocks ``index`` (what the loss of those blocks averages over)."""
        lab = self.labels[np.asarray(index)]
        return int((lab[:, 1:] != -100).sum())

    def batch(self, index: Sequence[int]) -> dict:
        """Blocks ``index`` as torch tensors (int64 ids/labels, attention mask)."""
        import torch

        idx = np.asarray(index)
        return {"input_ids": torch.from_numpy(self.input_ids[idx].astype(np.int64)),
                "labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
                "attention_mask": torch.from_numpy(self.attention_mask[idx].astype(np.int64)),
                "block_index": torch.from_numpy(idx.astype(np.int64))}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id of a byte-level BPE tokenizer (special tokens: their text's)."""
    from trkit.vocab import byte_decoder

    dec = byte_decoder()
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int32)
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    for tok, i in vocab.items():
        if tok in special:
            lengths[i] = len(tok.encode("utf-8"))
        elif all(c in dec for c in tok):
            lengths[i] = len(tok)
        else:
            lengths[i] = len(tok.encode("utf-8"))
    return lengths


def pack_text(tokenizer, documents: Documents | Sequence[str], seq_len: int, *, separator_id: int | None = None,
              batch: int = 2000, progress: bool = False) -> Packed:
    """Pack running text (see the module doc). Raises if the text packs to zero blocks."""
    from trkit.progress import tqdm

    from trkit.evaluation import document_prefix_id

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    texts = documents.texts if isinstance(documents, Documents) else list(documents)
    sep = document_prefix_id(tokenizer) if separator_id is None else separator_id
    lengths = token_byte_lengths(tokenizer)
    ids_parts, doc_parts, end_parts = [], [], []
    misaligned = 0
    for lo in tqdm(range(0, len(texts), batch), desc="tokenise", disable=not progress, unit="batch"):
        chunk = texts[lo : lo + batch]
        for k, ids in enumerate(tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            d = lo + k
            arr = np.asarray(ids, dtype=np.int32)
            ends = np.cumsum(lengths[arr]) if len(arr) else np.zeros(0, dtype=np.int64)
            if len(arr) and int(ends[-1]) != len(chunk[k].encode("utf-8")):
                misaligned += 1  # the tokenizer normalised the text: byte offsets would not match it
            ids_parts.append(np.concatenate([[sep], arr]).astype(np.int32))
            doc_parts.append(np.full(len(arr) + 1, d, dtype=np.int32))
            end_parts.append(np.concatenate([[0], ends]).astype(np.int32))
    stream = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    docs = np.concatenate(doc_parts) if doc_parts else np.zeros(0, dtype=np.int32)
    ends = np.concatenate(end_parts) if end_parts else np.zeros(0, dtype=np.int32)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the corpus packs to zero blocks: {len(stream)} tokens, fewer than one block of --seq-len "
                         f"{seq_len}; pass more text or a shorter --seq-len")
    cut = n * seq_len
    ids = stream[:cut].reshape(n, seq_len)
    return Packed(input_ids=ids, labels=ids.copy(), attention_mask=np.ones_like(ids, dtype=np.int8),
                  doc=docs[:cut].reshape(n, seq_len), end_byte=ends[:cut].reshape(n, seq_len),
                  stats={"documents": len(texts), "tokens": int(len(stream)), "blocks": n, "seq_len": seq_len,
                         "dropped_tail_tokens": int(len(stream) - cut), "misaligned_documents": misaligned,
                         "separator_id": int(sep), "format": "text"})


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not text.startswith(through) or not through.startswith(before):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix, so the "
                             "assistant turns cannot be located; use a template without history rewriting")
        spans.append((len(before), len(through)))
    return text, spans


def pack_chat(tokenizer, documents: Documents | Sequence[list[dict]], seq_len: int, *, progress: bool = False) -> Packed:
    """Pack conversations (see the module doc): loss only on assistant turns, never split across blocks."""
    from trkit.progress import tqdm

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; --format chat needs one (save it with the tokenizer)")
    convs = documents.texts if isinstance(documents, Documents) else list(documents)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks_ids, blocks_lab, blocks_doc, blocks_end = [], [], [], []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    cur_doc: list[int] = []
    cur_end: list[int] = []
    truncated = 0
    labelled = 0

    def flush():
        if not cur_ids:
            return
        fill = seq_len - len(cur_ids)
        blocks_ids.append(cur_ids + [pad] * fill)
        blocks_lab.append(cur_lab + [-100] * fill)
        blocks_doc.append(cur_doc + [-1] * fill)
        blocks_end.append(cur_end + [0] * fill)
        cur_ids.clear(), cur_lab.clear(), cur_doc.clear(), cur_end.clear()

    for d, messages in enumerate(tqdm(convs, desc="render", disable=not progress, unit="conv")):
        text, spans = _assistant_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        inside = [any(a < e and s < b for a, b in spans) for s, e in offsets]
        # a label marks the token to be predicted: position t's label is token t (HF shifts it)
        lab = [t if ok else -100 for t, ok in zip(ids, inside)]
        byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
        ends = [int(byte_at[e]) for _, e in offsets]  # character offsets -> UTF-8 byte offsets
        if len(ids) > seq_len:
            ids, lab, ends = ids[:seq_len], lab[:seq_len], ends[:seq_len]
            truncated += 1
        if len(cur_ids) + len(ids) > seq_len:
            flush()
        cur_ids.extend(ids)
        cur_lab.extend(lab)
        cur_doc.extend([d] * len(ids))
        cur_end.extend(ends)
        labelled += sum(x != -100 for x in lab)
    flush()
    if not blocks_ids or labelled == 0:
        raise ValueError("the conversations pack to zero trainable blocks (no assistant tokens); check the data's "
                         "roles (user/assistant) or columns (instruction/response)")
    ids = np.asarray(blocks_ids, dtype=np.int32)
    return Packed(input_ids=ids, labels=np.asarray(blocks_lab, dtype=np.int32),
                  attention_mask=(np.asarray(blocks_doc) >= 0).astype(np.int8), doc=np.asarray(blocks_doc, dtype=np.int32),
                  end_byte=np.asarray(blocks_end, dtype=np.int32),
                  stats={"documents": len(convs), "blocks": len(blocks_ids), "seq_len": seq_len, "format": "chat",
                         "truncated_conversations": truncated, "labelled_tokens": int(labelled)})


def pack(tokenizer, documents: Documents, seq_len: int, *, progress: bool = False) -> Packed:
    """:func:`pack_text` or :func:`pack_chat` by the documents' kind."""
    if documents.kind == "chat":
        return pack_chat(tokenizer, documents, seq_len, progress=progress)
    return pack_text(tokenizer, documents, seq_len, progress=progress)


@functools.lru_cache(maxsize=4)
def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of one epoch: a permutation drawn from ``(seed, epoch)`` alone, so a resumed run
    (or another process) computes the same order without any saved state."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_blocks)
