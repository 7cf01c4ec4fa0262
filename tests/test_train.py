"""The training stage: new-row helpers (PEFT trainable tokens, parameter groups), packing, training loops."""

from __future__ import annotations

import pytest
import torch

from trkit import embeddings, train


def test_peft_helpers(qwen_ext, tied_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trkit import assets

    untied = embeddings.extend_model(assets.tiny_qwen3(), qwen_ext, init="fvt", output_init="first")
    idx = train.trainable_token_indices(untied, qwen_ext)
    assert idx == {"embed_tokens": qwen_ext.new_ids, "lm_head": qwen_ext.new_ids}
    tied = embeddings.extend_model(AutoModelForCausalLM.from_pretrained(tied_dir), qwen_ext, init="fvt", output_init="fvt")
    assert train.trainable_token_indices(tied, qwen_ext) == {"embed_tokens": qwen_ext.new_ids}
    peft_model = get_peft_model(untied, train.new_rows_peft_config(untied, qwen_ext))
    groups = train.new_rows_param_groups(peft_model, lr=1e-3, embedding_lr_ratio=0.25)
    assert groups[0]["lr"] == pytest.approx(2.5e-4) and len(groups) == 1
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == 2 * len(qwen_ext.new_ids) * 64  # input and output rows, nothing else
    lora = get_peft_model(embeddings.extend_model(assets.tiny_qwen3(), qwen_ext, output_init="first"),
                          train.new_rows_peft_config(untied, qwen_ext, r=4, target_modules=["q_proj"]))
    groups = train.new_rows_param_groups(lora, lr=1e-3)
    assert [g["name"] for g in groups] == ["new_token_rows", "adapters"] and groups[0]["lr"] == pytest.approx(2e-4)



def test_train_new_rows_changes_only_new_rows(qwen_ext):
    from transformers import AutoTokenizer

    from trkit import assets

    tok = AutoTokenizer.from_pretrained(qwen_ext.directory)
    docs = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:200]
    blocks = train.pack_documents(tok, docs, 32)
    assert blocks.shape[1] == 33 and (blocks >= qwen_ext.base_vocab_size).any()
    model = embeddings.extend_model(assets.tiny_qwen3(), qwen_ext, output_init="first")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, history = train.train_new_rows(model, qwen_ext, tok, docs, steps=3, batch_size=2, seq_len=32, lr=1e-2,
                                          progress=False, log_every=1)
    after = trained.state_dict()
    assert set(after) == set(before) and len(history) == 3
    new = torch.tensor(qwen_ext.new_ids)
    for k, v in after.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            keep = torch.ones(len(v), dtype=torch.bool)
            keep[new] = False
            assert torch.equal(v[keep], before[k][keep]), k  # old rows and padding rows frozen
            assert not torch.equal(v[new], before[k][new]), k  # new rows trained
        else:
            assert torch.equal(v, before[k]), k


