"""The evaluation report (``python -m trkit evaluate``): is the adapted model better at Turkish, cheaper to run,
and did it forget English?

What it does. :func:`evaluate_models` takes any mix of models (a checkpoint with an optional PEFT
adapter: base, extended at init, trained, distilled) and measures each on the *same* texts, prompts
and benchmark items, one model in memory at a time (Qwen3-8B in 4-bit on a T4 fits once, not twice):

* **tokenizer** (:func:`trkit.tokstats.compare`): tokens per word on the Turkish and English texts and
  % fewer tokens than the base tokenizer (the first model's, unless ``base_tokenizer``);
* **bits per character / byte** (:func:`trkit.evaluation.score_documents`, each document scored on its
  own after the document separator) on Turkish, English and every extra text: the one number that
  compares models across vocabularies;
* **generation** (:func:`trkit.generation.measure`): characters/s, tokens/s and characters per token
  on Turkish continuations, the share of generated tokens that are new tokens against that share in
  the tokenizer's own encoding of the Turkish text, the share of continuations that are Turkish, and
  the vowel-harmony rate of the generated Turkish words against the text's;
* **TurkMorfBench** (:mod:`trkit.morphbench`): the package's forced-choice protocol, overall, real and
  nonce stems, per bucket, beside the package's published leaderboard;
* **lm-evaluation-harness** tasks (:mod:`trkit.harness`; on GPU profiles when ``lm_eval`` is installed):
  ``acc`` and ``acc_norm`` of the Turkish tasks.

The output directory holds ``report.json`` (for scripts: ``{"models": [{"label", "model", "adapter",
"bits_per_char": {"turkish", "english", ...}, "tokens_per_word": {"turkish", "english"},
"generation": {...}, "turkmorfbench": {...}, ...}]}``, accuracies and shares as fractions),
``report.md`` (:func:`markdown_tables`), four PNG plots and a ``trkit_manifest.json``; all of it is
written under a temporary name and renamed into place (:func:`trkit.artifacts.atomic_directory`).
Every option is checked before the first model loads. :func:`add_to_model_cards` (``--model-cards``,
notebook 05) puts the same tables in the model card of each evaluated training run.

Sizes (characters of text, prompts, new tokens, benchmark items) default per hardware profile
(:data:`PROFILE_SIZES`): the ``cpu`` profile measures less so the demo stays short; its numbers carry
their sizes in the report, so a subset is never mistaken for the full benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

PLOTS = {"bpc": "bpc.png", "tokens_per_word": "tokens_per_word.png", "speed": "chars_per_s.png",
         "turkmorfbench": "turkmorfbench_buckets.png"}


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report: a model (directory, hub name or offline alias) and an optional PEFT adapter."""

    model: str
    adapter: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = Path(str(self.model).rstrip("/")).name or str(self.model)
        return f"{base}+{Path(str(self.adapter).rstrip('/')).name}" if self.adapter else base


@dataclass(frozen=True)
class EvalSizes:
    """How much of everything is measured. 0 characters / items = all of the text / the core set."""

    turkish_chars: int = 0
    english_chars: int = 0
    prompts: int = 5
    prompt_words: int = 8
    max_new_tokens: int = 48
    sample: bool = True
    morph_items: int = 0
    max_length: int = 1024  # bits-per-character window, tokens
    batch_size: int = 8  # bits-per-character windows per forward
    morph_batch_size: int = 32  # TurkMorfBench sequences per forward
    tasks: tuple[str, ...] | None = None  # lm-eval tasks; None = the profile's default, () = none
    tasks_limit: int | None = None  # documents per lm-eval task (None = all)

    def __post_init__(self):
        for name in ("turkish_chars", "english_chars", "morph_items"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
        for name in ("prompts", "prompt_words", "max_new_tokens", "max_length", "batch_size", "morph_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tasks_limit is not None and self.tasks_limit < 1:
            raise ValueError(f"tasks_limit must be >= 1, got {self.tasks_limit}")


# The cpu profile is the offline demo on SmolLM2: a few minutes per model on 2 cores. GPU profiles
# measure the whole validation split, the whole core set and the lm-eval tasks.
PROFILE_SIZES: dict[str, EvalSizes] = {
    "cpu": EvalSizes(turkish_chars=6_000, english_chars=3_000, prompts=3, max_new_tokens=32, morph_items=120,
                     max_length=256, batch_size=32),
    # lm-eval on a T4 (Qwen3-8B in 4-bit) takes the first 100 documents of each task (of each of Global-MMLU's
    # 57 subjects) so the four tasks fit a free Colab session (not timed here: no GPU); the A100 runs them whole.
    "t4": EvalSizes(turkish_chars=0, english_chars=50_000, prompts=10, max_new_tokens=128, morph_items=0,
                    max_length=1024, batch_size=4, morph_batch_size=32, tasks_limit=100),
    "a100": EvalSizes(turkish_chars=0, english_chars=50_000, prompts=10, max_new_tokens=128, morph_items=0,
                      max_length=1024, batch_size=16, morph_batch_size=128),
    "gpu": EvalSizes(turkish_chars=0, english_chars=50_000, prompts=10, max_new_tokens=128, morph_items=0,
                     max_length=1024, batch_size=4, morph_batch_size=32, tasks_limit=100),
}


def default_sizes(profile: str, **overrides) -> EvalSizes:
    """The sizes of ``profile`` ('cpu', 't4', 'a100', 'gpu') with ``overrides`` (None values ignored)."""
    if profile not in PROFILE_SIZES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILE_SIZES)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EvalSizes)}
    if unknown:
        raise ValueError(f"unknown size(s) {sorted(unknown)}")
    values = {k: (tuple(v) if k == "tasks" else v) for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PROFILE_SIZES[profile], **values)


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def sample_documents(documents: Sequence[str], max_chars: int, seed: int = 0) -> list[str]:
    """At most about ``max_chars`` characters of whole documents, drawn at random (seeded) from the
    whole file so every source of a pooled file is represented, kept in file order; 0 = all."""
    docs = list(documents)
    if not max_chars or sum(len(d) for d in docs) <= max_chars:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        picked.append(i)
        total += len(docs[i])
    return [docs[i] for i in sorted(picked)]


def _text_stats(path, docs: Sequence[str]) -> dict:
    return {"file": str(path), "documents": len(docs), "chars": sum(len(d) for d in docs)}


# --------------------------------------------------------------------------------------------
# Checks before anything is loaded
# --------------------------------------------------------------------------------------------


def check_specs(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """Models are named, adapters exist, labels are unique; returns the specs as :class:`ModelSpec`."""
    out = []
    for s in specs:
        s = s if isinstance(s, ModelSpec) else ModelSpec(**s) if isinstance(s, dict) else ModelSpec(str(s))
        if not str(s.model).strip():
            raise ValueError("a --model is empty: pass a model directory, hub name or offline alias")
        if s.adapter is not None:
            adapter = Path(s.adapter)
            if not (adapter / "adapter_config.json").is_file():
                raise FileNotFoundError(f"--adapter {s.adapter}: no adapter_config.json there; pass a PEFT adapter "
                                        "directory (the output of `trkit train` or PeftModel.save_pretrained)")
        out.append(s)
    if not out:
        raise ValueError("no model to evaluate: pass at least one --model")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two models would both be labelled {', '.join(dupes)}: give each a --label NAME after its --model")
    return out


def _resolve_tasks(sizes: EvalSizes, profile_name: str, include_path, progress: bool):
    """(tasks, lm-eval task manager or None, a note for the report)."""
    from trkit import harness

    if sizes.tasks is not None:
        tasks = list(sizes.tasks)
        if not tasks:
            return [], None, "not run (no tasks asked for)"
        harness.require()  # asked for explicitly: a missing lm_eval is an error, said in one line
    else:
        if profile_name == "cpu":
            return [], None, "not run on the cpu profile (pass --tasks to run some)"
        if not harness.available():
            note = f"not run: lm-evaluation-harness is not installed ({harness.INSTALL_HINT})"
            print(f"trkit evaluate: lm-eval tasks {note}", file=sys.stderr)
            return [], None, note
        tasks = harness.default_tasks()
    manager = harness.task_manager(include_path)
    harness.check_tasks(tasks, manager)
    return tasks, manager, None


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def _free(model) -> None:
    del model
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def evaluate_one(spec: ModelSpec, prof, sizes: EvalSizes, *, base_tokenizer, texts: dict[str, list[str]],
                 prompts: list[str], morph_items: list[dict], tasks: list[str], task_manager=None,
                 dtype: str | None = None, progress: bool = True) -> dict:
    """Every measurement of one model (module doc); the model is freed before returning."""
    from trkit import evaluation, generation, morphbench, tokstats
    from trkit.loading import load_model

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_model(spec.model, prof, adapter=spec.adapter, dtype=dtype)
    merged = False
    if spec.adapter is not None and not getattr(model, "is_loaded_in_4bit", False) and hasattr(model, "merge_and_unload"):
        # PEFT's own merge (DoRA, LoRA, token rows): the function the adapter defines, at the base model's speed
        # (PEFT's unmerged DoRA recomputes its weight norms every forward, ~5x slower on CPU); 4-bit bases stay
        # unmerged (re-quantising would change the weights)
        source = getattr(model, "_trkit_source", str(spec.model))
        model = model.merge_and_unload()
        model._trkit_source = source
        merged = True
    seconds["load"] = time.perf_counter() - t0
    name = spec.name
    row: dict[str, Any] = {"label": name, "model": str(spec.model), "adapter": None if spec.adapter is None else str(spec.adapter),
                           "source": getattr(model, "_trkit_source", str(spec.model)), "vocab_size": len(tok),
                           "adapter_merged": merged}
    try:
        t0 = time.perf_counter()
        stats = tokstats.compare(base_tokenizer, tok, {"turkish": texts["turkish"], "english": texts["english"]})
        src = stats["sources"]
        row["tokens_per_word"] = {k: src[k]["fertility"] for k in ("turkish", "english")}
        row["pct_fewer_tokens"] = {k: src[k]["pct_fewer"] for k in ("turkish", "english")}
        row["chars_per_token"] = {k: src[k]["chars_per_token"] for k in ("turkish", "english")}
        row["tokenizer"] = {"base_vocab_size": stats["base_vocab_size"], "vocab_size": stats["vocab_size"],
                            "extends_base": generation.extends(base_tokenizer, tok),
                            "sources": {k: {c: src[k][c] for c in ("tokens", "base_tokens", "words", "roundtrip_failures")}
                                        for k in ("turkish", "english")}}
        seconds["tokenizer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bpc, bpb, scored = {}, {}, {}
        for key, docs in texts.items():
            score = evaluation.score_documents(model, tok, docs, max_length=sizes.max_length, batch_size=sizes.batch_size,
                                               progress=progress, desc=f"{name}: bpc {key}")
            bpc[key], bpb[key], scored[key] = score.bits_per_char, score.bits_per_byte, score.to_dict()
        row["bits_per_char"], row["bits_per_byte"], row["scored_text"] = bpc, bpb, scored
        seconds["bits_per_char"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        settings = generation.GenerationSettings(prompts=sizes.prompts, prompt_words=sizes.prompt_words,
                                                 max_new_tokens=sizes.max_new_tokens, sample=sizes.sample)
        row["generation"] = generation.measure(model, tok, prompts, texts["turkish"], settings,
                                               base_tokenizer=base_tokenizer, progress=progress, desc=f"{name}: generate")
        seconds["generation"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = morphbench.score_items(model, tok, morph_items, batch_size=sizes.morph_batch_size, progress=progress,
                                         desc=f"{name}: TurkMorfBench")
        row["turkmorfbench"] = morphbench.summarize(morph_items, results)
        seconds["turkmorfbench"] = time.perf_counter() - t0

        if tasks:
            from trkit import harness

            t0 = time.perf_counter()
            row["lm_eval"] = harness.run_tasks(model, tok, tasks, limit=sizes.tasks_limit, manager=task_manager,
                                               batch_size=sizes.batch_size)
            seconds["lm_eval"] = time.perf_counter() - t0
        else:
            row["lm_eval"] = None
    finally:
        _free(model)
    row["seconds"] = seconds
    return row


# --------------------------------------------------------------------------------------------
# All models
# --------------------------------------------------------------------------------------------


def evaluate_models(
    specs: Sequence[ModelSpec | dict | str],
    out_dir: str | os.PathLike | None,
    profile: Any = "auto",
    *,
    sizes: EvalSizes | None = None,
    base_tokenizer: str | None = None,
    turkish_text: str | os.PathLike | None = None,
    english_text: str | os.PathLike | None = None,
    texts: Sequence[str | os.PathLike] = (),
    tasks_include: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **size_overrides,
) -> dict:
    """Evaluate every model of ``specs`` on the same texts; write the report to ``out_dir`` (None: don't
    write) and return it. ``sizes`` (or keyword overrides such as ``morph_items=50``) default to the
    profile's :data:`PROFILE_SIZES`. ``turkish_text`` / ``english_text`` default to the offline
    validation split and English file; ``texts`` are extra files scored for bits per character."""
    from trkit import __version__, generation, morphbench
    from trkit.evaluation import read_documents
    from trkit.loading import load_tokenizer
    from trkit.options import check_output
    from trkit.profiles import Profile, get_profile

    t_start = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    if sizes is None:
        sizes = default_sizes(prof.name if prof.name in PROFILE_SIZES else "gpu", **size_overrides)
    elif size_overrides:
        sizes = dataclasses.replace(sizes, **{k: v for k, v in size_overrides.items() if v is not None})
    specs = check_specs(specs)
    text_paths = [Path(p) for p in texts]
    if out_dir is not None:  # before anything expensive: an --out that would destroy an input is refused now
        check_output(out_dir, inputs=[*(s.model for s in specs), *(s.adapter for s in specs), turkish_text, english_text,
                                      *text_paths, base_tokenizer], overwrite=overwrite)
    tasks, task_manager, tasks_note = _resolve_tasks(sizes, prof.name, tasks_include, progress)

    from trkit import assets

    turkish_path = Path(turkish_text) if turkish_text else assets.validation_file()
    english_path = Path(english_text) if english_text else assets.english_file()
    turkish_all = read_documents(turkish_path)
    docs = {"turkish": sample_documents(turkish_all, sizes.turkish_chars),
            "english": sample_documents(read_documents(english_path), sizes.english_chars)}
    paths = {"turkish": turkish_path, "english": english_path}
    for p in text_paths:
        key = p.stem if p.stem not in docs else str(p)
        docs[key], paths[key] = read_documents(p), p
    prompts = generation.turkish_prompts(turkish_all, sizes.prompts, sizes.prompt_words)
    items = morphbench.select_items(morphbench.load_items(), sizes.morph_items)
    base_name = base_tokenizer or str(specs[0].model)
    base_tok = load_tokenizer(base_name)

    rows = []
    for i, spec in enumerate(specs):
        if progress:
            print(f"[{i + 1}/{len(specs)}] {spec.name}", file=sys.stderr, flush=True)
        rows.append(evaluate_one(spec, prof, sizes, base_tokenizer=base_tok, texts=docs, prompts=prompts,
                                 morph_items=items, tasks=tasks, task_manager=task_manager, dtype=dtype,
                                 progress=progress))
    import torch

    report = {
        "trkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "profile": prof.name,
        "dtype": dtype or prof.dtype,
        "load_in_4bit": prof.load_in_4bit,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "sizes": dataclasses.asdict(sizes),
        "base_tokenizer": base_name,
        "texts": {k: _text_stats(paths[k], v) for k, v in docs.items()},
        "prompts": prompts,
        "turkmorfbench_info": {"source": "turkmorfbench==3.8.0 (eCloud Tech.; code Apache-2.0, data CC BY 4.0)",
                               "items": len(items), "core_items": morphbench.CORE_ITEMS,
                               "leaderboard": morphbench.leaderboard()},
        "lm_eval_tasks": tasks, "lm_eval_note": tasks_note,
        "models": rows,
    }
    report["seconds"] = time.perf_counter() - t_start
    if out_dir is not None:
        write_report(report, out_dir, overwrite=overwrite,
                     inputs=[*(s.model for s in specs), *(s.adapter for s in specs), *paths.values()])
    return report


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------


def _f(value, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _pct(value) -> str:
    return _f(None if value is None else 100 * value, "{:.1f}%")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ratio(value, first) -> str:
    return "" if value is None or not first else f" (×{value / first:.2f})"


def markdown_tables(report: dict) -> str:
    """The report's tables as Markdown (also what :func:`add_to_model_cards` puts in a training run's card)."""
    models = report["models"]
    first = models[0] if models else {}
    extra = [k for k in (first.get("bits_per_char") or {}) if k not in ("turkish", "english")]
    texts = report.get("texts", {})
    out = []

    head = ["model", "tokens/word TR", "fewer TR", "tokens/word EN", "fewer EN", "BPC TR", "BPB TR", "BPC EN", "BPB EN",
            *[f"BPC {k}" for k in extra]]
    rows = [[m["label"], _f(m["tokens_per_word"]["turkish"]), _f(m["pct_fewer_tokens"]["turkish"], "{:.1f}%"),
             _f(m["tokens_per_word"]["english"]), _f(m["pct_fewer_tokens"]["english"], "{:.1f}%"),
             _f(m["bits_per_char"]["turkish"], "{:.4f}"), _f(m["bits_per_byte"]["turkish"], "{:.4f}"),
             _f(m["bits_per_char"]["english"], "{:.4f}"), _f(m["bits_per_byte"]["english"], "{:.4f}"),
             *[_f(m["bits_per_char"].get(k), "{:.4f}") for k in extra]] for m in models]
    sizes = ", ".join(f"{k} {v['chars']:,} chars / {v['documents']} docs" for k, v in texts.items())
    out.append("### Tokenizer and bits per character\n\n" + _table(head, rows) +
               f"\n\nFewer = % fewer tokens than the base tokenizer ({report.get('base_tokenizer')}). Texts: {sizes}.")

    g0 = first.get("generation") or {}
    head = ["model", "chars/s", "tokens/s", "chars/token", "new-token share (reference)", "Turkish continuations",
            "stopped early", "vowel harmony (reference)"]
    rows = []
    for m in models:
        g = m["generation"]
        rows.append([m["label"], _f(g["chars_per_s"], "{:.1f}") + _ratio(g["chars_per_s"], g0.get("chars_per_s")),
                     _f(g["tokens_per_s"], "{:.1f}"),
                     _f(g["chars_per_token"], "{:.2f}") + _ratio(g["chars_per_token"], g0.get("chars_per_token")),
                     f"{_pct(g['new_token_share'])} ({_pct(g['reference_new_token_share'])})",
                     f"{g['turkish_continuations']}/{g['continuations']}", f"{g['stopped_early']}/{g['continuations']}",
                     f"{_pct(g['vowel_harmony'])} ({_pct(g['reference_vowel_harmony'])})"])
    sizes = report.get("sizes", {})
    out.append("### Generation (Turkish prompts)\n\n" + _table(head, rows) +
               f"\n\n{sizes.get('prompts')} prompts, greedy{' + sampled' if sizes.get('sample') else ''}, "
               f"up to {sizes.get('max_new_tokens')} new tokens each. Speed and chars/token count Turkish continuations "
               "only (× = ratio to the first row); new-token share over all generated tokens, beside the share in the "
               "tokenizer's own encoding of the Turkish text.")
    from trkit.generation import GenerationSettings

    defaults = GenerationSettings()
    modes = [mode for mode in ("greedy", "sampled") if any(mode in (m["generation"].get("modes") or {}) for m in models)]
    if len(modes) > 1:  # greedy continuations of small models loop on a few short tokens; sampled ones read as text
        head = ["model", "mode", "chars/s", "chars/token", "new-token share", "Turkish continuations"]
        rows = []
        for mode in modes:
            b0 = (g0.get("modes") or {}).get(mode, {})
            for m in models:
                g = (m["generation"].get("modes") or {}).get(mode)
                if g:
                    rows.append([m["label"], mode, _f(g["chars_per_s"], "{:.1f}") + _ratio(g["chars_per_s"], b0.get("chars_per_s")),
                                 _f(g["chars_per_token"], "{:.2f}") + _ratio(g["chars_per_token"], b0.get("chars_per_token")),
                                 _pct(g["new_token_share"]), f"{g['turkish_continuations']}/{g['continuations']}"])
        out.append("### Generation by decoding mode\n\n" + _table(head, rows) +
                   "\n\nThe same continuations split by mode (× = ratio to the first model in the same mode). Greedy "
                   "continuations of a small model tend to loop on a few short, frequent tokens; sampled ones "
                   f"(temperature {defaults.temperature}, top-p {defaults.top_p}) are closer to what the model writes.")

    info = report.get("turkmorfbench_info", {})
    head = ["model", "accuracy", "95% interval (stems)", "real stems", "nonce stems", "items"]
    rows = []
    for m in models:
        t = m["turkmorfbench"]
        ci = t.get("interval95")
        rows.append([m["label"], _pct(t["accuracy"]), f"{_pct(ci[0])}–{_pct(ci[1])}" if ci else "–",
                     _pct(t["real"]), _pct(t["nonce"]), str(t["items"])])
    board = info.get("leaderboard") or []
    named = [r for r in board if r["rank"] <= 3 or r["model"].startswith(("Qwen3-32B", "Turkish-Llama-8b-v0.1"))]
    context = "; ".join(f"{r['model']} {100 * r['accuracy']:.1f}" for r in named)
    subset = "" if info.get("items") == info.get("core_items") else (
        f" Measured on {info.get('items')} of the {info.get('core_items')} core items (seeded subset, "
        "`turkmorfbench olc --en-fazla`): not comparable to the leaderboard's full core set.")
    out.append("### TurkMorfBench (forced choice)\n\n" + _table(head, rows) +
               f"\n\nPublished leaderboard (core set, bf16): {context or '–'}.{subset}")

    buckets = sorted({b for m in models for b in m["turkmorfbench"]["buckets"]})
    if buckets:
        head = ["bucket", "items", *[m["label"] for m in models]]
        rows = [[b, str(first["turkmorfbench"]["buckets"].get(b, {}).get("items", "–")),
                 *[_pct(m["turkmorfbench"]["buckets"].get(b, {}).get("accuracy")) for m in models]] for b in buckets]
        out.append("### TurkMorfBench per bucket\n\n" + _table(head, rows))

    tasks = report.get("lm_eval_tasks") or []
    if tasks:
        head = ["task", *[m["label"] for m in models]]
        rows = [[t, *[f"{_pct((m['lm_eval'] or {}).get(t, {}).get('acc'))} / {_pct((m['lm_eval'] or {}).get(t, {}).get('acc_norm'))}"
                      for m in models]] for t in tasks]
        limit = sizes.get("tasks_limit")
        out.append("### lm-evaluation-harness (acc / acc_norm)\n\n" + _table(head, rows) +
                   (f"\n\nThe first {limit} documents of each task (lm-eval `limit`)." if limit else ""))
    elif report.get("lm_eval_note"):
        out.append(f"lm-evaluation-harness: {report['lm_eval_note']}.")
    return "\n\n".join(out) + "\n"


def _bars(groups: list[str], series: dict[str, list], title: str, ylabel: str, percent: bool = False):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        vals = [float("nan") if v is None else (100 * v if percent else v) for v in values]
        ax.bar(xs, vals, width=width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_bpc(report: dict):
    """Bits per character per model and text (lower is better)."""
    models = report["models"]
    keys = list(models[0]["bits_per_char"])
    return _bars([m["label"] for m in models], {k: [m["bits_per_char"][k] for m in models] for k in keys},
                 "Bits per character (lower is better)", "bits / character")


def plot_tokens_per_word(report: dict):
    """Tokens per word on the Turkish and English texts."""
    models = report["models"]
    return _bars([m["label"] for m in models], {k: [m["tokens_per_word"][k] for m in models] for k in ("turkish", "english")},
                 "Tokens per word (lower is cheaper)", "tokens / word")


def plot_speed(report: dict):
    """Characters per second of Turkish continuations."""
    models = report["models"]
    return _bars([m["label"] for m in models], {"chars/s": [m["generation"]["chars_per_s"] for m in models]},
                 "Generation speed on Turkish continuations", "characters / s")


def plot_turkmorfbench(report: dict):
    """TurkMorfBench accuracy per bucket and model."""
    models = report["models"]
    buckets = sorted({b for m in models for b in m["turkmorfbench"]["buckets"]})
    return _bars(buckets, {m["label"]: [m["turkmorfbench"]["buckets"].get(b, {}).get("accuracy") for b in buckets]
                           for m in models}, "TurkMorfBench accuracy per bucket", "accuracy (%)", percent=True)


PLOTTERS = {"bpc": plot_bpc, "tokens_per_word": plot_tokens_per_word, "speed": plot_speed,
            "turkmorfbench": plot_turkmorfbench}


def write_report(report: dict, out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence = ()) -> Path:
    """``report.json``, ``report.md``, the plots and a manifest, renamed into ``out_dir`` when complete."""
    from trkit.artifacts import atomic_directory, write_manifest

    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / "report.json").write_text(text + "\n", encoding="utf-8")
        (tmp / "report.md").write_text("# trkit evaluation report\n\n" + markdown_tables(report), encoding="utf-8")
        for key, fname in PLOTS.items():
            fig = PLOTTERS[key](report)
            fig.savefig(tmp / fname, dpi=110)
        write_manifest(tmp, stage="evaluate", models=[{k: m[k] for k in ("label", "model", "adapter")} for m in report["models"]],
                       profile=report["profile"], sizes=report["sizes"])
    return Path(out_dir)


CARD_SECTION = "## Evaluation (trkit evaluate)"


def card_with_report(card: str, report: dict, label: str) -> str:
    """``card`` with its evaluation section (if any) replaced by the report's tables."""
    head = ("\n" + card).split("\n" + CARD_SECTION, 1)[0].strip("\n")
    section = (f"{CARD_SECTION}\n\nThis adapter is the row **{label}** below, measured {time.strftime('%Y-%m-%d')} "
               f"on the `{report.get('profile')}` profile beside the other models of the same report.\n\n"
               f"{markdown_tables(report)}")
    return f"{head}\n\n{section}" if head else section


def _card_is_mutable(directory: Path, manifest: dict, cards: Sequence[str]) -> None:
    """Take the model cards out of ``directory``'s hashed files (listed under ``mutable`` instead), so that
    each later card write, atomic on its own, leaves a manifest that verifies whenever it is killed."""
    from trkit.artifacts import MANIFEST_NAME, atomic_write_json

    if not any(rel in manifest.get("files", {}) for rel in cards):
        return
    files = {k: v for k, v in manifest["files"].items() if k not in cards}
    sizes = {k: v for k, v in manifest.get("sizes", {}).items() if k not in cards}
    atomic_write_json(directory / MANIFEST_NAME, {**manifest, "files": files, "sizes": sizes,
                                                  "mutable": sorted({*manifest.get("mutable", []), *cards})})


def add_to_model_cards(report: dict) -> list[Path]:
    """Put the report's tables in the model card of every evaluated adapter that ``trkit train`` wrote
    (``RUN/README.md`` and ``RUN/adapter/README.md``, the adapter's own card, which travels with it to the
    hub); other adapters are left alone. Only the cards change: each is written under a temporary name and
    renamed, after the manifests stop hashing them, so a kill at any moment leaves a run that loads."""
    from trkit.artifacts import atomic_write_text, read_manifest

    done = []
    for m in report["models"]:
        if not m.get("adapter"):
            continue
        adapter = Path(m["adapter"]).resolve()
        run = adapter.parent
        try:
            run_manifest, adapter_manifest = read_manifest(run, verify=False), read_manifest(adapter, verify=False)
        except (FileNotFoundError, ValueError):
            continue
        if (run_manifest.get("stage"), adapter_manifest.get("stage"), run_manifest.get("adapter")) != (
                "train", "train-adapter", adapter.name):
            continue
        cards = ["README.md", f"{adapter.name}/README.md"]
        _card_is_mutable(run, run_manifest, cards)
        _card_is_mutable(adapter, adapter_manifest, ["README.md"])
        for rel in cards:
            path = run / rel
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            atomic_write_text(path, card_with_report(text, report, m["label"]))
        done.append(run)
    return done


# --------------------------------------------------------------------------------------------
# CLI: python -m trkit evaluate --model A [--adapter X] [--label L] [--model B ...] --out DIR [--json]
# --------------------------------------------------------------------------------------------


class _ModelAction(argparse.Action):
    """``--model`` starts a new row; ``--adapter`` and ``--label`` belong to the ``--model`` before them."""

    def __call__(self, parser, namespace, value, option_string=None):
        rows = list(getattr(namespace, "models", None) or [])
        if option_string == "--model":
            rows.append({"model": value, "adapter": None, "label": None})
        else:
            key = option_string.lstrip("-")
            if not rows:
                parser.error(f"{option_string} {value}: put it after the --model it belongs to")
            if rows[-1][key] is not None:
                parser.error(f"{option_string} given twice for --model {rows[-1]['model']}; each --model takes one")
            rows[-1] = {**rows[-1], key: value}
        namespace.models = rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trkit.options import nonnegative_int, positive_int

    parser.set_defaults(models=None)
    parser.add_argument("--model", action=_ModelAction, metavar="DIR_OR_NAME",
                        help="a model to evaluate (repeat for more rows): directory, hub name or offline alias (smollm2)")
    parser.add_argument("--adapter", action=_ModelAction, metavar="DIR", help="PEFT adapter of the --model before it")
    parser.add_argument("--label", action=_ModelAction, metavar="NAME", help="row name of the --model before it")
    parser.add_argument("--out", required=True, help="output directory (report.md, report.json, plots)")
    parser.add_argument("--json", action="store_true", help="also print report.json on stdout")
    parser.add_argument("--profile", default="auto", help="hardware profile: auto | cpu | t4 | a100 | gpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="override the profile's dtype")
    parser.add_argument("--base-tokenizer", help="tokenizer that 'fewer tokens' and 'new tokens' refer to "
                                                 "(default: the first model's)")
    parser.add_argument("--turkish-text", help="Turkish text, one document per line (default: offline validation split)")
    parser.add_argument("--english-text", help="English text, one document per line (default: offline English file)")
    parser.add_argument("--text", nargs="+", default=[], metavar="FILE", help="more text files scored for bits per character")
    parser.add_argument("--turkish-chars", type=nonnegative_int, help="characters of Turkish text (0 = all; cpu: 20000)")
    parser.add_argument("--english-chars", type=nonnegative_int, help="characters of English text (0 = all; cpu: 10000)")
    parser.add_argument("--prompts", type=positive_int, help="Turkish prompts for generation (cpu: 5)")
    parser.add_argument("--prompt-words", type=positive_int, help="words per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="new tokens per continuation (cpu: 48)")
    parser.add_argument("--no-sample", action="store_true", help="greedy continuations only (default: greedy + sampled)")
    parser.add_argument("--morph-items", type=nonnegative_int, help="TurkMorfBench items (0 = all 1,836; cpu: 300)")
    parser.add_argument("--max-length", type=positive_int, help="bits-per-character window in tokens (cpu: 256)")
    parser.add_argument("--batch-size", type=positive_int, help="bits-per-character windows per forward")
    parser.add_argument("--morph-batch-size", type=positive_int, help="TurkMorfBench sequences per forward")
    parser.add_argument("--tasks", nargs="*", metavar="TASK",
                        help="lm-eval tasks (default on GPU profiles: the Turkish tasks when lm_eval is installed; "
                             "cpu: none); --tasks with no names runs none")
    parser.add_argument("--tasks-limit", type=positive_int, help="documents per lm-eval task (default: all)")
    parser.add_argument("--tasks-include", metavar="DIR", help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out written by trkit")
    parser.add_argument("--model-cards", action="store_true",
                        help="also put the tables in the model card of each evaluated adapter a trkit train run wrote")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    from trkit.options import check_output

    if not args.models:
        raise ValueError("no model to evaluate: pass --model DIR_OR_NAME (repeat for more rows)")
    specs = check_specs([ModelSpec(**m) for m in args.models])
    check_output(args.out, inputs=[*(s.model for s in specs), *(s.adapter for s in specs), args.turkish_text,
                                   args.english_text, *args.text, args.base_tokenizer], overwrite=args.overwrite)
    for p in [args.turkish_text, args.english_text, *args.text]:
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such text file; pass a UTF-8 file with one document per line")
    overrides = {"turkish_chars": args.turkish_chars, "english_chars": args.english_chars, "prompts": args.prompts,
                 "prompt_words": args.prompt_words, "max_new_tokens": args.max_new_tokens,
                 "sample": False if args.no_sample else None, "morph_items": args.morph_items,
                 "max_length": args.max_length, "batch_size": args.batch_size,
                 "morph_batch_size": args.morph_batch_size, "tasks": args.tasks, "tasks_limit": args.tasks_limit}
    report = evaluate_models(specs, args.out, args.profile, base_tokenizer=args.base_tokenizer,
                             turkish_text=args.turkish_text, english_text=args.english_text, texts=args.text,
                             tasks_include=args.tasks_include, dtype=args.dtype, overwrite=args.overwrite,
                             progress=not args.quiet, **overrides)
    if args.model_cards:
        for run in add_to_model_cards(report):
            print(f"added the tables to {run}/README.md and its adapter's model card", file=sys.stderr)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, allow_nan=False))
    else:
        print(markdown_tables(report))
        print(f"wrote {args.out}/report.md, report.json and {len(PLOTS)} plots ({report['seconds']:.0f} s)", file=sys.stderr)
    return 0
