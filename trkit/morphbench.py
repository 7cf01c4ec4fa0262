"""TurkMorfBench: Turkish morphology by forced choice, scored exactly as the benchmark's own code does it.

What it measures. TurkMorfBench (eCloud Tech., PyPI ``turkmorfbench==3.8.0``; code Apache-2.0, data
CC BY 4.0; https://github.com/ecloudtechnology/turkmorfbench) asks for one inflected form of a stem
(vowel harmony, consonant alternation, buffer consonants, case and possessive stacks, lexical
exceptions) on real stems and on nonce (wug) stems that occur in no corpus. Its 1,836-item core set
(``turkmorfbench/veri/cekirdek.json``) ships in the wheel, which :func:`trkit.assets.turkmorfbench_dir`
fetches pinned by sha256 (never installed, never imported). Each item has the stem ``govde``, the
gold form ``altin``, rule-violating distractors ``celdirici`` ({rule broken: form}), its bucket
``kova`` and ``gercek`` (real stem, else nonce).

The protocol (``turkmorfbench/olcum.py``: ``Yerel.olasilik`` and ``_tek_madde``, scoring rule of
3.7.0), reproduced step by step:

    prompt    = "Kelime: {govde}\\nÇekimli biçim: "          (ISTEM % (govde, ""))
    p, f      = tokenizer(prompt).input_ids, tokenizer(prompt + candidate).input_ids
                (each with the tokenizer's own special tokens, as ``tok(...)`` does by default)
    c         = length of the common prefix of p and f
    scored    = f[max(1, c):]   (a token that straddles the prompt|candidate boundary, e.g. " kal",
                counts for the candidate; if nothing is left, the last token)
    score     = sum_{t in scored} log P(f_t | f_<t)  /  len(candidate)      (characters, not tokens)
    choice    = argmax over [gold, *distractors] in that order (a tie goes to the gold form,
                as Python's ``max`` keeps the first maximum)

Dividing by characters keeps tokenizers comparable (a vocabulary that spends fewer tokens on a word is
not rewarded or punished for it). One difference is deliberate: the package takes the log-softmax
in the model's dtype (bf16), trkit in float32, so a near-tie between candidates can fall the other way;
``benchmarks/bench_morphbench.py`` checks that the two accuracies agree within a point on SmolLM2.

Speed. The package scores one candidate per forward pass. Here all (item, candidate) sequences are
sorted by length and scored in left-padded batches by trkit.evaluation's windowed scorer, which
builds logits only for the scored tail of each sequence (the candidate's few tokens), in float32.

Reported: accuracy overall, on real and on nonce stems, per bucket and per distractor rule chosen,
with a 95% interval from a bootstrap over stems (items of one stem are not independent; the package's
``istatistik`` module makes the same point), beside the package's published leaderboard (parsed from
the wheel's own description, so the numbers are the package's, not ours).
"""

from __future__ import annotations

import collections
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

PROMPT = "Kelime: %s\nÇekimli biçim: "  # turkmorfbench.olcum.ISTEM % (stem, "")
CORE_ITEMS = 1836
SUBSET_SEED = 1337  # turkmorfbench.veri.suz's seed: a subset of n items = the package's `olc --en-fazla n`
REQUIRED_FIELDS = ("kimlik", "govde", "altin", "celdirici", "kova", "gercek")


# --------------------------------------------------------------------------------------------
# Items and leaderboard
# --------------------------------------------------------------------------------------------


def load_items(path: str | Path | None = None) -> list[dict]:
    """The core set's items (``cekirdek.json``; default: the pinned wheel's, via trkit.assets)."""
    if path is None:
        from trkit import assets

        path = assets.turkmorfbench_dir() / "cekirdek.json"
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TurkMorfBench item file ({exc})") from None
    items = data.get("maddeler") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected {{\"maddeler\": [...]}} with at least one item")
    for item in items:
        missing = [k for k in REQUIRED_FIELDS if k not in item]
        if missing or not isinstance(item["celdirici"], dict) or not item["celdirici"]:
            raise ValueError(f"{path}: item {item.get('kimlik', '?')} lacks {missing or ['distractors']}")
    return items


def select_items(items: Sequence[dict], n: int = 0, seed: int = SUBSET_SEED) -> list[dict]:
    """All items (``n`` = 0 or >= len) or a seeded subset of ``n``: the same items as the package's
    ``turkmorfbench olc --en-fazla n`` (``random.Random(1337).shuffle``, then the first n)."""
    items = list(items)
    if n < 0:
        raise ValueError(f"the number of items must be >= 0 (0 = all), got {n}")
    if not n or n >= len(items):
        return items
    random.Random(seed).shuffle(items)
    return items[:n]


_LEADERBOARD_ROW = re.compile(
    r"^\|\s*(?P<rank>\d+)\s*\|\s*(?P<model>[^|]+?)\s*\|\s*(?P<developer>[^|]+?)\s*\|\s*(?P<size>[^|]+?)\s*\|"
    r"\s*\*\*(?P<acc>\d+\.\d+)\*\*\s*\|")


def leaderboard(metadata: str | Path | None = None) -> list[dict]:
    """The published leaderboard from the wheel's description (English table: 3.6 core set, ``harf``
    rule, bf16): ``[{"rank", "model", "developer", "size", "accuracy"}]``, accuracy as a fraction."""
    if metadata is None:
        from trkit import assets

        metadata = assets.turkmorfbench_dir() / "METADATA"
    text = Path(metadata).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        m = _LEADERBOARD_ROW.match(line)
        if m:  # the Turkish table writes 78,4: only the English one (78.4) matches
            rows.append({"rank": int(m["rank"]), "model": m["model"].replace("*", "").strip(),
                         "developer": m["developer"], "size": m["size"], "accuracy": float(m["acc"]) / 100})
    return rows


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def candidates(item: dict) -> list[tuple[str, str]]:
    """``[("altin", gold), (rule, distractor), ...]`` in the package's order."""
    return [("altin", item["altin"]), *item["celdirici"].items()]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def candidate_sequence(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> tuple[list[int], int]:
    """``(full ids, number of scored tail tokens)`` under the package's boundary rule (module doc)."""
    start = max(1, _common_prefix(prompt_ids, full_ids))
    return list(full_ids), max(1, len(full_ids) - start)


def encode_items(tokenizer, items: Sequence[dict]) -> list[tuple[list[int], int, int]]:
    """One ``(ids, n_scored, n_chars)`` per candidate of every item, items in order, candidates in
    :func:`candidates` order."""
    prompts = [PROMPT % item["govde"] for item in items]
    prompt_ids = tokenizer(prompts)["input_ids"]
    texts, owners = [], []
    for i, item in enumerate(items):
        for _, form in candidates(item):
            texts.append(prompts[i] + form)
            owners.append((i, len(form)))
    full_ids = tokenizer(texts)["input_ids"]
    out = []
    for (i, n_chars), ids in zip(owners, full_ids):
        seq, n_scored = candidate_sequence(prompt_ids[i], ids)
        out.append((seq, n_scored, n_chars))
    return out


def choose(scores: dict[str, float]) -> str:
    """The candidate with the highest score; the first of equal maxima (the gold form comes first)."""
    return max(scores, key=scores.__getitem__)


@dataclass
class ItemResult:
    kimlik: str
    correct: bool
    chosen: str  # "altin" or the distractor's rule name
    scores: dict  # candidate name -> log-likelihood per character


def score_items(model, tokenizer, items: Sequence[dict], *, batch_size: int = 32, progress: bool = True,
                desc: str = "TurkMorfBench") -> list[ItemResult]:
    """Forced choice on every item (module doc): one :class:`ItemResult` per item, in order."""
    import torch
    from trkit.progress import tqdm

    from trkit.evaluation import _nll_of_batch  # the windowed scorer of bits per character (float32 log-softmax)

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_items(tokenizer, items)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    top = max(max(seq) for seq, _, _ in encoded)
    if top >= n_vocab:
        raise ValueError(f"the tokenizer produces id {top} but the model has only {n_vocab} embedding rows: "
                         "use the model that belongs to this tokenizer")
    logp = [-1e9] * len(encoded)  # the package's score for a sequence of fewer than 2 tokens
    order = sorted((k for k, (seq, _, _) in enumerate(encoded) if len(seq) >= 2), key=lambda k: -len(encoded[k][0]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="cand", disable=not progress) as bar:
            for lo in range(0, len(order), batch_size):
                batch = order[lo: lo + batch_size]
                nll = _nll_of_batch(model, [encoded[k][0] for k in batch], [encoded[k][1] for k in batch], device)
                for k, v in zip(batch, nll):
                    logp[k] = -v / max(1, encoded[k][2])
                bar.update(len(batch))
    finally:
        model.train(was_training)
    results, k = [], 0
    for item in items:
        names = [name for name, _ in candidates(item)]
        scores = dict(zip(names, logp[k: k + len(names)]))
        k += len(names)
        chosen = choose(scores)
        results.append(ItemResult(item["kimlik"], chosen == "altin", chosen, scores))
    return results


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def stem_bootstrap_interval(items: Sequence[dict], correct: Sequence[bool], *, resamples: int = 1000,
                            seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of accuracy when whole stems (``govde``) are resampled with replacement."""
    by_stem: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for item, ok in zip(items, correct):
        by_stem[item["govde"]][0] += int(ok)
        by_stem[item["govde"]][1] += 1
    clusters = list(by_stem.values())
    if len(clusters) < 2:
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        picked = rng.choices(clusters, k=len(clusters))
        stats.append(sum(c for c, _ in picked) / sum(n for _, n in picked))
    stats.sort()
    lo = stats[int((1 - level) / 2 * (resamples - 1))]
    hi = stats[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def summarize(items: Sequence[dict], results: Sequence[ItemResult]) -> dict:
    """``{"accuracy", "real", "nonce", "items", "correct", "interval95", "buckets": {kova: {...}},
    "errors": {rule: count}}``: accuracies as fractions in [0, 1] (None where a group is empty)."""
    if len(items) != len(results):
        raise ValueError(f"{len(items)} items but {len(results)} results")
    correct = [r.correct for r in results]
    buckets: dict[str, list[bool]] = collections.defaultdict(list)
    for item, ok in zip(items, correct):
        buckets[item["kova"]].append(ok)
    interval = stem_bootstrap_interval(items, correct)
    return {
        "accuracy": _share(correct),
        "real": _share([ok for item, ok in zip(items, correct) if item["gercek"]]),
        "nonce": _share([ok for item, ok in zip(items, correct) if not item["gercek"]]),
        "items": len(items),
        "correct": sum(correct),
        "real_items": sum(1 for item in items if item["gercek"]),
        "nonce_items": sum(1 for item in items if not item["gercek"]),
        "interval95": list(interval) if interval else None,
        "buckets": {k: {"accuracy": _share(v), "items": len(v)} for k, v in sorted(buckets.items())},
        "errors": dict(collections.Counter(r.chosen for r in results if not r.correct).most_common()),
        "core_set": len(items) == CORE_ITEMS,
    }


def evaluate(model, tokenizer, *, n_items: int = 0, items: Sequence[dict] | None = None, batch_size: int = 32,
             progress: bool = True, return_results: bool = False) -> dict[str, Any]:
    """TurkMorfBench on ``model``: the core set (or a seeded subset of ``n_items``), summarised."""
    chosen = select_items(load_items() if items is None else items, n_items)
    results = score_items(model, tokenizer, chosen, batch_size=batch_size, progress=progress)
    summary = summarize(chosen, results)
    if return_results:
        summary["results"] = [asdict(r) for r in results]
    return summary
