"""trkit.harness: lm-eval's HFLM on the model object trkit loaded, exercised offline on a local task."""

from __future__ import annotations

import json
import sys

import pytest

from trkit import harness

DOCS = [
    {"question": "Türkiye'nin başkenti", "choices": ["Ankara", "Paris", "Berlin"], "label": 0},
    {"question": "Kedi bir", "choices": ["hayvandır", "arabadır"], "label": 0},
    {"question": "İki artı iki", "choices": ["dört eder", "beş eder", "altı"], "label": 0},
    {"question": "Gökyüzü", "choices": ["mavidir", "yeşildir"], "label": 1},
    {"question": "Su yüz derecede", "choices": ["kaynar", "donar", "erir"], "label": 2},
    {"question": "Kitap okumak", "choices": ["faydalıdır", "zararlıdır"], "label": 0},
]


def write_task(root, name="trkit_tiny_choice"):
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8")
    return name


def own_accuracy(model, tok):
    """acc / acc_norm computed here: log P(" choice" | question) summed over the choice's tokens
    (lm-eval's context/continuation split: encode the whole, cut at the context's length)."""
    import torch

    acc = norm = 0
    for doc in DOCS:
        ctx = tok(doc["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        per_char = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        norm += max(range(len(lls)), key=per_char.__getitem__) == doc["label"]
    return acc / len(DOCS), norm / len(DOCS)


def test_run_tasks_on_a_local_task_matches_own_scoring(tmp_path, tiny_qwen3_dir):
    pytest.importorskip("lm_eval")
    from trkit.loading import load_model

    model, tok = load_model(tiny_qwen3_dir, "cpu", dtype="float32")
    name = write_task(tmp_path)
    out = harness.run_tasks(model, tok, [name], include_path=tmp_path, include_defaults=False, batch_size=4)
    acc, norm = own_accuracy(model, tok)
    assert out[name]["samples"] == len(DOCS)
    assert out[name]["acc"] == pytest.approx(acc)
    assert out[name]["acc_norm"] == pytest.approx(norm)
    assert out[name]["acc_stderr"] is not None


def test_unknown_task_is_refused_before_the_model_runs(tmp_path, tiny_qwen3_dir):
    pytest.importorskip("lm_eval")
    write_task(tmp_path)
    manager = harness.task_manager(tmp_path, include_defaults=False)
    with pytest.raises(ValueError, match="unknown lm-eval task.*trkit_tiny_chioce.*did you mean trkit_tiny_choice"):
        harness.check_tasks(["trkit_tiny_chioce"], manager)


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(RuntimeError) as err:
        harness.require()
    message = str(err.value)
    assert "\n" not in message and "pip install" in message and "trkit[eval]" in message


def test_gated_task_needs_access(monkeypatch):
    monkeypatch.setattr(harness, "has_dataset_access", lambda repo: repo == "AYueksel/TurkishMMLU")
    assert harness.default_tasks() == [*harness.TASKS, "turkishmmlu"]
    monkeypatch.setattr(harness, "has_dataset_access", lambda repo: False)
    assert harness.default_tasks() == list(harness.TASKS)
