"""trkit.trainer: the GNB pass inside the HF Trainer and a plain loop (cadence, resume, fp16 GradScaler)."""

from __future__ import annotations

import pytest
import torch

from trkit.sophia import SophiaG
from trkit.trainer import HessianSchedule, SophiaConfig, TrkitTrainer, run_gnb_pass

VOCAB, LENGTH = 40, 12


def tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_batches(n: int, batch: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt without labels, as in instruction tuning
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rows(n: int) -> list[dict]:
    return [{k: v[0] for k, v in b.items()} for b in make_batches(n, batch=1, seed=3)]


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=9, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="steps", save_steps=6, report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_resume_mid_run_equals_uninterrupted(tmp_path):
    data = ListDataset(_rows(48))
    config = SophiaConfig(k=3, rho=0.05)

    full = TrkitTrainer(model=tiny_lm(), args=_args(tmp_path / "a"), train_dataset=data, sophia=config)
    full.train()
    assert isinstance(full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer, SophiaG)
    # passes at global steps 0 (warm start, before the first update), 3, 6: never twice in one step
    assert [s.global_step for s in full.hessian_schedule.history] == [0, 3, 6]
    assert full.hessian_schedule.history[0].initialized
    assert all(s.positions == 2 * (LENGTH - 3) for s in full.hessian_schedule.history)  # one micro-batch of labels
    logged = [h for h in full.state.log_history if "sophia/win_rate" in h]
    assert logged and all(0.0 <= h["sophia/win_rate"] <= 1.0 for h in logged)

    # resume at step 6, a multiple of k: the pass for step 6 must run after the resume, as it did in `full`
    resumed = TrkitTrainer(model=tiny_lm(seed=1), args=_args(tmp_path / "b"), train_dataset=data, sophia=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert [s.global_step for s in resumed.hessian_schedule.history] == [6]
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_trainer_with_another_optimizer_runs_no_gnb_pass(tmp_path):
    trainer = TrkitTrainer(model=tiny_lm(), args=_args(tmp_path, max_steps=2, save_strategy="no"),
                           train_dataset=ListDataset(_rows(8)))
    trainer.train()
    assert trainer.hessian_schedule is None
    assert not any("sophia/win_rate" in h for h in trainer.state.log_history)


def _plain_loop(scaler=None, steps=6, k=2, autocast=None):
    model = tiny_lm()
    opt = SophiaG(model.parameters(), lr=1e-2, rho=0.05)
    schedule = HessianSchedule(opt, k=k, seed=0, max_grad_norm=1.0)
    context = autocast or torch.autocast("cpu", enabled=False)
    for step, batch in enumerate(make_batches(steps)):
        schedule.maybe_update(model, batch, step, scaler=scaler, forward_context=lambda: context)
        with context:
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return model, opt, schedule


def test_plain_loop_grad_scaler_path_matches_unscaled():
    ref_model, ref_opt, ref_sched = _plain_loop()
    model, opt, sched = _plain_loop(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert [s.global_step for s in sched.history] == [0, 2, 4] == [s.global_step for s in ref_sched.history]
    assert not any(s.skipped for s in sched.history)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(ref_opt.state[p]["hessian"], opt.state[q]["hessian"], rtol=1e-5, atol=1e-12)


def test_fp16_overflowing_gnb_pass_is_skipped_and_training_goes_on():
    model = tiny_lm()
    opt = SophiaG(model.parameters(), lr=1e-2)
    batch = make_batches(1)[0]
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    ok = run_gnb_pass(model, batch, opt, initialize=True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
                      forward_context=fp16, generator=torch.Generator().manual_seed(0))
    assert not ok.skipped and ok.initialized
    before = {p: opt.state[p]["hessian"].clone() for p in model.parameters()}
    huge = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    stats = run_gnb_pass(model, batch, opt, scaler=huge, forward_context=fp16, generator=torch.Generator().manual_seed(1))
    assert stats.skipped
    assert all(torch.equal(before[p], opt.state[p]["hessian"]) for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    # the scaler was not marked "unscaled": an ordinary fp16 training step still works with it
    with fp16():
        loss = model(**batch).loss
    huge.scale(loss).backward()
    huge.unscale_(opt)
    huge.step(opt)
    huge.update()
    assert huge.get_scale() < 2.0**40  # it saw the overflow of that step and backed off


def test_schedule_cadence_and_warm_start_switch():
    opt = SophiaG(tiny_lm().parameters())
    on = HessianSchedule(opt, k=10)
    assert [s for s in range(31) if on.due(s)] == [0, 10, 20, 30]
    off = HessianSchedule(opt, k=10, warm_start=False)
    assert [s for s in range(31) if off.due(s)] == [10, 20, 30]
    with pytest.raises(ValueError):
        HessianSchedule(opt, k=0)
    with pytest.raises(TypeError):
        HessianSchedule(torch.optim.AdamW(tiny_lm().parameters()))


def test_gnb_pass_refuses_accumulated_gradients_and_sets_bs():
    model = tiny_lm()
    opt = SophiaG(model.parameters())
    batch = make_batches(1)[0]
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="already accumulated"):
        run_gnb_pass(model, batch, opt)
    opt.zero_grad(set_to_none=True)
    stats = run_gnb_pass(model, batch, opt)
    assert stats.positions == 2 * (LENGTH - 3)
    assert all(g["bs"] == stats.positions for g in opt.param_groups)
