"""trkit.generation: continuations of Turkish prompts, new-token share, Turkishness, timing bookkeeping."""

from __future__ import annotations

import pytest

from trkit import generation
from trkit.evaluation import document_prefix_id
from trkit.generation import Continuation, GenerationSettings

TURKISH = [
    "Bu sabah erkenden kalkıp çarşıya gittim ve taze ekmek ile biraz peynir aldım, sonra eve döndüm.",
    "The quick brown fox jumps over the lazy dog and then runs away into the forest with the others.",
    "Öğrenciler için hazırlanan bu kitap, Türkiye'nin tarihini ve kültürünü anlatan güzel bir eserdir.",
    "Kısa bir cümle.",
    "Dün akşam arkadaşlarımızla birlikte sahilde yürüdük, deniz çok sakindi ve hava da serindi biraz.",
]


class FakeTokenizer:
    def __init__(self, vocab, encodings=None):
        self.vocab, self.encodings = vocab, encodings

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [self.encodings[d] for d in docs]}


def test_turkish_prompts_take_turkish_documents_only():
    prompts = generation.turkish_prompts(TURKISH, 3, words=6)
    assert prompts == ["Bu sabah erkenden kalkıp çarşıya gittim", "Öğrenciler için hazırlanan bu kitap, Türkiye'nin",
                       "Dün akşam arkadaşlarımızla birlikte sahilde yürüdük,"]
    with pytest.raises(ValueError, match="only 3 Turkish documents"):
        generation.turkish_prompts(TURKISH, 4, words=6)


def test_extends_means_same_ids_for_every_base_token():
    base = FakeTokenizer({"a": 0, "b": 1})
    assert generation.extends(base, FakeTokenizer({"a": 0, "b": 1, "ab": 2}))
    assert generation.extends(base, base)
    assert not generation.extends(base, FakeTokenizer({"b": 0, "a": 1, "ab": 2}))  # another tokenizer
    assert not generation.extends(FakeTokenizer({"a": 0, "b": 1, "c": 2}), FakeTokenizer({"a": 0, "b": 1}))


def test_reference_new_token_share_counts_ids_from_the_base_length():
    tok = FakeTokenizer({}, {"evler": [7, 1], "masalar": [5, 9, 2]})
    ref = generation.reference_stats(tok, ["evler", "masalar"], base_size=5)
    assert ref["tokens"] == 5 and ref["new_tokens"] == 3 and ref["new_token_share"] == pytest.approx(0.6)
    assert ref["chars_per_token"] == pytest.approx(12 / 5)
    assert ref["vowel_harmony"] == 1.0 and ref["vowel_harmony_words"] == 2
    assert generation.reference_stats(tok, ["evler"], base_size=None)["new_token_share"] is None


def _cont(text, *, seconds, generated, content, new, turkish, mode="greedy"):
    return Continuation(prompt="p", mode=mode, text=text, ids=[], generated=generated, content_tokens=content,
                        new_tokens=new, chars=len(text), seconds=seconds, stopped_early=generated < 10,
                        turkish_score=0.9 if turkish else 0.0, is_turkish=turkish)


def test_summary_counts_speed_on_turkish_only_and_new_tokens_everywhere():
    conts = [_cont("evlerimiz güzel", seconds=2.0, generated=10, content=10, new=6, turkish=True),
             _cont("the house is nice", seconds=1.0, generated=10, content=9, new=0, turkish=False),
             _cont("kitaplar masada", seconds=3.0, generated=8, content=5, new=4, turkish=True)]
    s = generation.summarize(conts, base_size=100, reference={"new_token_share": 0.5, "chars_per_token": 4.0,
                                                              "vowel_harmony": 0.9})
    assert s["chars_per_s"] == pytest.approx((15 + 15) / 5.0)
    assert s["tokens_per_s"] == pytest.approx(18 / 5.0)
    assert s["chars_per_token"] == pytest.approx(30 / 15)
    assert s["new_token_share"] == pytest.approx(10 / 24)
    assert s["reference_new_token_share"] == 0.5
    assert s["turkish_share"] == pytest.approx(2 / 3)
    assert s["stopped_early"] == 1 and s["continuations"] == 3
    assert s["vowel_harmony"] == pytest.approx(3 / 4)  # evlerimiz, güzel, masada obey; kitaplar (i a a) does not
    assert s["chars_per_s_all"] == pytest.approx(47 / 6.0)
    nothing = generation.summarize(conts[1:2], base_size=None)
    assert nothing["chars_per_s"] is None and nothing["new_token_share"] is None and nothing["turkish_share"] == 0.0


@pytest.fixture(scope="module")
def ext_model(tiny_qwen3_dir, qwen_ext):
    """The tiny Qwen3 with the 64-token extension's tokenizer: its 151,936 rows hold ids up to 151,732."""
    from trkit.loading import load_model

    model, tok = load_model(tiny_qwen3_dir, "cpu", tokenizer=qwen_ext.directory, dtype="float32")
    return model, tok


def _always(model, token_id):
    """Replace the head so every step's argmax is ``token_id`` (zero weights, one positive bias)."""
    import torch

    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[token_id] = 10.0
    old, model.lm_head = model.lm_head, head
    return old


def test_new_token_share_of_real_generations(ext_model, qwen3_tokenizer):
    model, tok = ext_model
    base = len(qwen3_tokenizer)
    new_id = base + 3
    settings = GenerationSettings(prompts=2, max_new_tokens=4, sample=False, warmup_tokens=1)
    prompts = generation.turkish_prompts(TURKISH, 2, words=4)
    old = _always(model, new_id)
    try:
        out = generation.measure(model, tok, prompts, TURKISH[:1], settings, base_tokenizer=qwen3_tokenizer, progress=False)
        assert out["extends_base"] and out["base_vocab_size"] == base
        for s in out["samples"]:
            assert s["ids"] == [new_id] * 4 and s["new_tokens"] == 4 and s["generated"] == 4
            assert s["text"] == tok.decode([new_id] * 4) and s["chars"] == len(s["text"]) and s["seconds"] > 0
            assert not s["stopped_early"]
        assert out["new_token_share"] == 1.0 and out["generated_tokens"] == 8
        ref = out["reference"]
        ids = tok(TURKISH[:1], add_special_tokens=False)["input_ids"][0]
        assert ref["new_tokens"] == sum(i >= base for i in ids) and ref["tokens"] == len(ids)

        model.lm_head = old
        _always(model, qwen3_tokenizer.convert_tokens_to_ids("ev"))
        assert generation.measure(model, tok, prompts, TURKISH[:1], settings, base_tokenizer=qwen3_tokenizer,
                                  progress=False)["new_token_share"] == 0.0

        _always(model, tok.eos_token_id)  # stops at once: reported, not hidden
        out = generation.measure(model, tok, prompts, TURKISH[:1], settings, base_tokenizer=qwen3_tokenizer, progress=False)
        assert out["stopped_early"] == 2 and out["generated_tokens"] == 2 and all(s["content_tokens"] == 0 for s in out["samples"])

        # the document separator ends a continuation too, even where it is not the model's EOS:
        # what a model writes after it is a new document, not the prompt's continuation
        sep = document_prefix_id(tok)
        saved_cfg, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
        saved_eos, tok.eos_token = tok.eos_token, "<|im_end|>"
        try:
            assert sep != tok.eos_token_id
            _always(model, sep)
            out = generation.measure(model, tok, prompts, TURKISH[:1], settings, base_tokenizer=qwen3_tokenizer, progress=False)
            assert out["stopped_early"] == 2 and all(s["ids"] == [sep] for s in out["samples"])
        finally:
            tok.eos_token, model.generation_config.eos_token_id = saved_eos, saved_cfg
    finally:
        model.lm_head = old


def test_sampled_continuations_are_seeded(ext_model):
    model, tok = ext_model
    settings = GenerationSettings(prompts=1, max_new_tokens=5, sample=True, warmup_tokens=1, seed=3)
    prompts = generation.turkish_prompts(TURKISH, 1, words=4)
    a = generation.generate_continuations(model, tok, prompts, settings, progress=False)
    b = generation.generate_continuations(model, tok, prompts, settings, progress=False)
    assert [c.mode for c in a] == ["greedy", "sampled"]
    assert [c.ids for c in a] == [c.ids for c in b]
    assert all(c.generated == 5 for c in a)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0)
