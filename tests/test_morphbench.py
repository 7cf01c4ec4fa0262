"""trkit.morphbench: TurkMorfBench's forced-choice protocol, data and summary."""

from __future__ import annotations

import json

import pytest

from trkit import morphbench


@pytest.fixture(scope="module")
def items():
    return morphbench.load_items()


def reference_score(model, tok, stem: str, candidate: str) -> float:
    """The package's Yerel.olasilik restated for one candidate, unbatched, float32 log-softmax."""
    import torch

    prompt = "Kelime: %s\nÇekimli biçim: " % stem
    p = tok(prompt, add_special_tokens=True).input_ids
    f = tok(prompt + candidate, add_special_tokens=True).input_ids
    common = 0
    while common < min(len(p), len(f)) and p[common] == f[common]:
        common += 1
    with torch.no_grad():
        logp = model(torch.tensor([f])).logits[0, :-1].float().log_softmax(-1)
    per_token = logp.gather(-1, torch.tensor(f[1:]).unsqueeze(-1)).squeeze(-1)
    tail = per_token[max(0, common - 1):]
    tail = tail if tail.numel() else per_token[-1:]
    return float(tail.sum()) / max(1, len(candidate))


def test_core_set_and_leaderboard_come_from_the_pinned_wheel(items):
    assert len(items) == morphbench.CORE_ITEMS == 1836
    assert sum(i["gercek"] for i in items) == 1338  # real stems; 498 nonce
    assert len({i["kova"] for i in items}) == 14
    board = {r["model"]: r["accuracy"] for r in morphbench.leaderboard()}
    assert len(board) == 17
    assert board["kanarya-2b"] == pytest.approx(0.784)
    assert board["Qwen3-32B (taban)"] == pytest.approx(0.734)
    assert board["Turkish-Llama-8b-v0.1"] == pytest.approx(0.720)


def test_subset_is_the_packages_en_fazla_subset(items):
    # turkmorfbench.veri.suz(yukle("cekirdek"), en_fazla=100), read off the package once
    subset = morphbench.select_items(items, 100)
    assert [i["kimlik"] for i in subset[:3]] == ["0dd6a009bc03", "7b32b748d0b1", "9b02b9ccdfdf"]
    assert subset[-1]["kimlik"] == "b44b682007a3"
    assert morphbench.select_items(items, 0) == list(items)
    assert [i["kimlik"] for i in items[:2]] == ["06e56260f0cb", items[1]["kimlik"]]  # the input is not shuffled
    with pytest.raises(ValueError, match=">= 0"):
        morphbench.select_items(items, -1)


def test_boundary_rule():
    # the straddling token (prompt ends in ": ", candidate starts " kal") counts for the candidate
    assert morphbench.candidate_sequence([5, 6, 7], [5, 6, 9, 10]) == ([5, 6, 9, 10], 2)
    assert morphbench.candidate_sequence([5, 6, 7], [5, 6, 7, 8, 9]) == ([5, 6, 7, 8, 9], 2)
    # nothing in common: every token after the first is scored
    assert morphbench.candidate_sequence([1], [2, 3, 4]) == ([2, 3, 4], 2)
    # nothing left for the candidate: the last token
    assert morphbench.candidate_sequence([5, 6, 7], [5, 6, 7]) == ([5, 6, 7], 1)


def test_ties_go_to_the_gold_form():
    assert morphbench.choose({"altin": -1.5, "uyum": -1.5, "zamir_n": -2.0}) == "altin"
    assert morphbench.choose({"altin": -1.5, "uyum": -1.25}) == "uyum"


def test_batched_scores_equal_the_protocol_unbatched(tiny_qwen3_dir, items):
    from trkit.loading import load_model

    model, tok = load_model(tiny_qwen3_dir, "cpu", dtype="float32")
    chosen = morphbench.select_items(items, 5)
    results = morphbench.score_items(model, tok, chosen, batch_size=4, progress=False)
    for item, res in zip(chosen, results):
        expected = {name: reference_score(model, tok, item["govde"], form) for name, form in morphbench.candidates(item)}
        assert list(res.scores) == list(expected)
        assert res.scores == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert res.chosen == max(expected, key=expected.get)
        assert res.correct == (res.chosen == "altin")


def test_summary_arithmetic():
    items = [{"kimlik": str(i), "govde": g, "kova": k, "gercek": real}
             for i, (g, k, real) in enumerate([("ev", "ad_cekimi", True), ("ev", "ad_cekimi", True),
                                               ("zakak", "ad_cekimi", False), ("kitap", "ad_yuva", True)])]
    results = [morphbench.ItemResult("0", True, "altin", {}), morphbench.ItemResult("1", False, "uyum", {}),
               morphbench.ItemResult("2", True, "altin", {}), morphbench.ItemResult("3", False, "uyum", {})]
    s = morphbench.summarize(items, results)
    assert s["accuracy"] == 0.5 and s["items"] == 4 and s["correct"] == 2
    assert s["real"] == pytest.approx(1 / 3) and s["nonce"] == 1.0
    assert s["buckets"] == {"ad_cekimi": {"accuracy": pytest.approx(2 / 3), "items": 3},
                            "ad_yuva": {"accuracy": 0.0, "items": 1}}
    assert s["errors"] == {"uyum": 2}
    lo, hi = s["interval95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert s["core_set"] is False


def test_bad_item_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"maddeler": [{"kimlik": "a", "govde": "ev"}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="lacks"):
        morphbench.load_items(bad)
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not a readable"):
        morphbench.load_items(bad)


@pytest.mark.slow
def test_smollm2_forced_choice_matches_the_protocol(smollm2_dir, items):
    """Real weights, where the choice matters: batched trkit vs the unbatched protocol, float32."""
    from trkit.loading import load_model

    import torch

    model, tok = load_model(smollm2_dir, "cpu", dtype="float32")
    chosen = morphbench.select_items(items, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: spin-waiting OpenMP threads make each forward slower
    try:
        summary = morphbench.evaluate(model, tok, items=chosen, batch_size=8, progress=False, return_results=True)
        for item, res in zip(chosen, summary["results"]):
            expected = {name: reference_score(model, tok, item["govde"], form) for name, form in morphbench.candidates(item)}
            assert res["scores"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
            assert res["chosen"] == max(expected, key=expected.get)
    finally:
        torch.set_num_threads(threads)
    assert summary["items"] == 6 and 0.0 <= summary["accuracy"] <= 1.0
