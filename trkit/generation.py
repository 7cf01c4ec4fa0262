"""Generation as a user feels it: speed on Turkish continuations, use of the new tokens, Turkishness, vowel harmony.

A vocabulary extension promises faster Turkish generation because each token carries more
characters. Whether that shows depends on the model actually *writing* with its new tokens: a model
extended at init may keep choosing the old, short tokens (or drift into English), and then the
characters per second do not move. This module measures that on continuations of Turkish prompts.

Protocol (the same for every model, so rows of a report compare):

* prompts: the first ``prompt_words`` words of Turkish reference documents (:func:`turkish_prompts`:
  documents that ``trkit.turkish.turkish_score`` calls Turkish, spread evenly over the file); each
  model encodes the same prompt text with its own tokenizer, after the document separator that
  bits-per-character scoring also conditions on (``trkit.evaluation.document_prefix_id``);
* decoding: a fresh ``GenerationConfig`` (no model-specific repetition penalty or sampling defaults),
  ``max_new_tokens`` for every model, stopping only at the model's end-of-sequence ids and at the
  document separator the prompt starts after (a model trained on packed documents ends one with it;
  what follows is a new, unrelated document, not a continuation of the prompt); one greedy
  continuation per prompt and, with ``sample``, one sampled (``temperature``, ``top_p``, seeded per
  prompt). How many continuations stopped early is reported beside the rates, never hidden;
* timing: one untimed warm-up generation first (first-call allocations, kernel selection), then each
  ``generate`` call is timed alone with ``time.perf_counter`` (CUDA synchronised), prompt prefill
  included (a shorter Turkish prompt is part of what a user gains);
* a continuation is Turkish when ``turkish_score(text) >= turkish_threshold``.

Reported (``measure``), over all continuations unless said otherwise:

    chars_per_s       = sum chars / sum seconds              (Turkish continuations only)
    tokens_per_s      = sum generated ids / sum seconds      (Turkish continuations only)
    chars_per_token   = sum chars / sum content tokens       (Turkish only; special ids not counted)
    new_token_share   = content ids >= len(base tokenizer) / content ids
    reference_new_token_share = the same share in the tokenizer's own encoding of the Turkish
                        reference text: what writing Turkish with this vocabulary would look like
    turkish_share     = Turkish continuations / continuations
    vowel_harmony     = words obeying major vowel harmony / words with >= 2 vowels, over the Turkish
                        continuations (``trkit.turkish.vowel_harmony``), beside the reference text's rate

The new-token shares are None when the model's tokenizer does not extend the base tokenizer (its
first ``len(base)`` ids are not the base's), because "new" means nothing there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

TURKISH_THRESHOLD = 0.5


@dataclass
class GenerationSettings:
    prompts: int = 5
    prompt_words: int = 8
    max_new_tokens: int = 48
    sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    warmup_tokens: int = 8
    turkish_threshold: float = TURKISH_THRESHOLD

    def __post_init__(self):
        for name in ("prompts", "prompt_words", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or not self.temperature > 0:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not 0 <= self.turkish_threshold <= 1:
            raise ValueError(f"turkish_threshold must be in [0, 1], got {self.turkish_threshold}")


@dataclass
class Continuation:
    prompt: str
    mode: str  # "greedy" | "sampled"
    text: str
    ids: list  # the generated ids (an end-of-sequence id included)
    generated: int  # len(ids)
    content_tokens: int  # of them, not special ids
    new_tokens: int  # content ids >= len(base tokenizer)
    chars: int
    seconds: float
    stopped_early: bool
    turkish_score: float
    is_turkish: bool


# --------------------------------------------------------------------------------------------
# Prompts and reference statistics
# --------------------------------------------------------------------------------------------


def turkish_prompts(documents: Sequence[str], n: int, words: int = 8,
                    threshold: float = TURKISH_THRESHOLD) -> list[str]:
    """``n`` prompts: the first ``words`` words of Turkish documents (at least twice as many words),
    taken evenly spaced over ``documents`` so every source of a pooled file is represented."""
    from trkit.turkish import turkish_score

    pool = [d for d in documents if len(d.split()) >= 2 * words and turkish_score(d) >= threshold]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} Turkish documents with >= {2 * words} words for {n} prompts: "
                         "pass more Turkish text or ask for fewer prompts")
    return [" ".join(pool[(i * len(pool)) // n].split()[:words]) for i in range(n)]


def extends(base_tokenizer, tokenizer) -> bool:
    """True when ``tokenizer``'s vocabulary holds every token of ``base_tokenizer`` under the same id
    (a vocabulary extension with ids from ``len(base)`` on, or the base itself)."""
    base_vocab = base_tokenizer.get_vocab()
    vocab = tokenizer.get_vocab()
    return len(tokenizer) >= len(base_tokenizer) and all(vocab.get(t) == i for t, i in base_vocab.items())


def vowel_harmony_counts(texts: Sequence[str]) -> tuple[int, int]:
    """(words obeying major vowel harmony, words with at least two vowels) over ``texts``."""
    from trkit.turkish import split_words, vowel_harmony

    ok = checked = 0
    for text in texts:
        for word in split_words(text):
            h = vowel_harmony(word)
            if h is not None:
                checked += 1
                ok += h
    return ok, checked


def reference_stats(tokenizer, documents: Sequence[str], base_size: int | None) -> dict:
    """The tokenizer's own encoding of Turkish reference text: tokens, chars per token, new-token
    share (ids >= ``base_size``; None without a base), and the text's vowel-harmony rate."""
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    tokens = sum(len(x) for x in ids)
    chars = sum(len(d) for d in documents)
    new = sum(1 for x in ids for i in x if base_size is not None and i >= base_size)
    ok, checked = vowel_harmony_counts(documents)
    return {"tokens": tokens, "chars": chars, "chars_per_token": chars / tokens if tokens else None,
            "new_tokens": new if base_size is not None else None,
            "new_token_share": new / tokens if base_size is not None and tokens else None,
            "vowel_harmony": ok / checked if checked else None, "vowel_harmony_words": checked}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _eos_ids(model, tokenizer, separator: int | None = None) -> list[int]:
    """The ids that end a continuation: the model's and tokenizer's EOS, and the document separator."""
    ids = set() if separator is None else {int(separator)}
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return sorted(ids)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_continuations(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, *,
                           base_size: int | None = None, progress: bool = True, desc: str = "generate") -> list[Continuation]:
    """Greedy (and sampled) continuations of every prompt, each ``generate`` call timed alone."""
    import torch
    from trkit.progress import tqdm
    from transformers import GenerationConfig

    from trkit.evaluation import document_prefix_id
    from trkit.turkish import turkish_score

    device = next(model.parameters()).device
    prefix = document_prefix_id(tokenizer)
    eos = _eos_ids(model, tokenizer, prefix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else prefix)
    special = set(tokenizer.all_special_ids)
    modes = [("greedy", False)] + ([("sampled", True)] if settings.sample else [])

    def config(do_sample: bool, n: int):
        kwargs = dict(max_new_tokens=n, do_sample=do_sample, pad_token_id=pad, eos_token_id=eos or None)
        if do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        return GenerationConfig(**kwargs)

    def run(prompt: str, do_sample: bool, n: int, seed: int):
        ids = torch.tensor([[prefix] + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        if do_sample:
            torch.manual_seed(seed)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config(do_sample, n))
        _sync(device)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.inference_mode():
            run(prompts[0], False, settings.warmup_tokens, settings.seed)  # warm-up, not timed
            with tqdm(total=len(prompts) * len(modes), desc=desc, unit="gen", disable=not progress) as bar:
                for i, prompt in enumerate(prompts):
                    for mode, do_sample in modes:
                        gen, seconds = run(prompt, do_sample, settings.max_new_tokens, settings.seed + i)
                        content = [t for t in gen if t not in special]
                        text = tokenizer.decode(gen, skip_special_tokens=True)
                        score = turkish_score(text)
                        results.append(Continuation(
                            prompt=prompt, mode=mode, text=text, ids=gen, generated=len(gen), content_tokens=len(content),
                            new_tokens=sum(t >= base_size for t in content) if base_size is not None else 0,
                            chars=len(text), seconds=seconds, stopped_early=len(gen) < settings.max_new_tokens,
                            turkish_score=score, is_turkish=score >= settings.turkish_threshold))
                        bar.update(1)
    finally:
        model.train(was_training)
    return results


def summarize(continuations: Sequence[Continuation], *, base_size: int | None, reference: dict | None = None) -> dict:
    """The rates of the module doc over ``continuations`` (see there); ``reference`` from :func:`reference_stats`."""
    turkish = [c for c in continuations if c.is_turkish]

    def ratio(num, den):
        return num / den if den else None

    seconds_tr = sum(c.seconds for c in turkish)
    content = sum(c.content_tokens for c in continuations)
    ok, checked = vowel_harmony_counts([c.text for c in turkish])
    reference = reference or {}
    return {
        "chars_per_s": ratio(sum(c.chars for c in turkish), seconds_tr),
        "tokens_per_s": ratio(sum(c.generated for c in turkish), seconds_tr),
        "chars_per_token": ratio(sum(c.chars for c in turkish), sum(c.content_tokens for c in turkish)),
        "new_token_share": ratio(sum(c.new_tokens for c in continuations), content) if base_size is not None else None,
        "reference_new_token_share": reference.get("new_token_share"),
        "reference_chars_per_token": reference.get("chars_per_token"),
        "turkish_share": ratio(len(turkish), len(continuations)),
        "vowel_harmony": ratio(ok, checked),
        "vowel_harmony_words": checked,
        "reference_vowel_harmony": reference.get("vowel_harmony"),
        "continuations": len(continuations),
        "turkish_continuations": len(turkish),
        "stopped_early": sum(c.stopped_early for c in continuations),
        "generated_tokens": sum(c.generated for c in continuations),
        "new_tokens": sum(c.new_tokens for c in continuations) if base_size is not None else None,
        "chars": sum(c.chars for c in continuations),
        "seconds": sum(c.seconds for c in continuations),
        # every continuation, Turkish or not: what the speed would be if English drift counted
        "chars_per_s_all": ratio(sum(c.chars for c in continuations), sum(c.seconds for c in continuations)),
    }


def measure(model, tokenizer, prompts: Sequence[str], reference_documents: Sequence[str],
            settings: GenerationSettings | None = None, *, base_tokenizer=None, progress: bool = True,
            desc: str = "generate") -> dict[str, Any]:
    """Continuations of ``prompts`` and their summary (module doc), pooled and per decoding mode.

    ``base_tokenizer`` (default: ``tokenizer`` itself) defines the new ids; the result holds
    ``"extends_base"`` and every continuation under ``"samples"`` (for side-by-side display).
    """
    settings = settings or GenerationSettings()
    base_tokenizer = base_tokenizer if base_tokenizer is not None else tokenizer
    base_size = len(base_tokenizer) if extends(base_tokenizer, tokenizer) else None
    reference = reference_stats(tokenizer, reference_documents, base_size)
    conts = generate_continuations(model, tokenizer, prompts, settings, base_size=base_size, progress=progress, desc=desc)
    out = summarize(conts, base_size=base_size, reference=reference)
    out["extends_base"] = base_size is not None
    out["base_vocab_size"] = len(base_tokenizer)
    out["max_new_tokens"] = settings.max_new_tokens
    out["modes"] = {mode: summarize([c for c in conts if c.mode == mode], base_size=base_size, reference=reference)
                    for mode in dict.fromkeys(c.mode for c in conts)}
    out["reference"] = reference
    out["samples"] = [asdict(c) for c in conts]
    return out
