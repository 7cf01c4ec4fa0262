"""trkit.trainer: the GNB pass inside the HF Trainer and a plain loop (scale, cadence, resume, fp16 GradScaler)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trkit.sophia import SophiaG, gauss_newton_bartlett_loss
from trkit.trainer import HessianSchedule, SophiaConfig, TrkitTrainer, curvature_forward, run_gnb_pass

VOCAB, LENGTH = 40, 12


def tiny_lm(seed: int = 0, **config_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **config_kwargs)
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


def _hessians(opt) -> list[torch.Tensor]:
    return [opt.state[p]["hessian"].clone() for g in opt.param_groups for p in g["params"]]


# --- the curvature scale with a varying number of label positions (softmax regression, exact GN known) ---

class SoftmaxRegression(nn.Module):
    """logits = x W^T + b over a (1, n + 1, d) "sequence"; the Gauss-Newton matrix is exact here."""

    def __init__(self, d: int, c: int, gen: torch.Generator):
        super().__init__()
        self.linear = nn.Linear(d, c, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(c, d, generator=gen, dtype=torch.float64))
            self.linear.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))

    def forward(self, inputs_embeds, attention_mask=None):
        return self.linear(inputs_embeds)


def _step_curvature(model, opt) -> torch.Tensor:
    """What a step divides by, read off the step itself: with beta1 = 0, rho = lr = 1 and a tiny
    gradient m (never clipped) the move is m / curvature, whatever the optimizer keeps internally."""
    m = 1e-6
    before = [q.detach().clone() for q in model.parameters()]
    for q in model.parameters():
        q.grad = torch.full_like(q, m)
    opt.step()
    return torch.cat([(m / (b - q.detach())).flatten() for q, b in zip(model.parameters(), before)])


def test_varying_positions_keep_the_curvature_on_the_gauss_newton_scale():
    """n drawn from 50-1000 over 300 passes: the step's curvature / exact GN diagonal ~ 1 whatever the last n.

    (Writing the last pass's n into a constant multiplier of EMA(g_hat**2) gave 0.2 for a last n of 60
    and 3 for 950.)"""
    gen = torch.Generator().manual_seed(0)
    d, c = 8, 6
    model = SoftmaxRegression(d, c, gen)
    pool = torch.randn(20000, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(model(pool), dim=-1)
        curv = probs * (1 - probs)  # diagonal of diag(p) - p p^T per position
        exact = torch.cat([(curv.T @ pool**2 / len(pool)).flatten(), curv.mean(0)])  # GN diagonal of the mean CE

    def new_opt(m):
        return SophiaG(m.parameters(), lr=1.0, betas=(0.0, 0.99), rho=1.0, weight_decay=0.0)

    def gnb_pass(m, opt, n, initialize=False):
        rows = pool[torch.randint(0, len(pool), (n + 1,), generator=gen)]  # n + 1 tokens: n predict a next one
        batch = {"inputs_embeds": rows[None], "attention_mask": torch.ones(1, n + 1)}
        stats = run_gnb_pass(m, batch, opt, initialize=initialize, generator=gen)
        assert stats.positions == n

    opt = new_opt(model)
    for i in range(299):
        gnb_pass(model, opt, int(torch.randint(50, 1001, (), generator=gen)), initialize=(i == 0))
    for last_n in (60, 950):
        m = copy.deepcopy(model)
        o = new_opt(m)
        o.load_state_dict(opt.state_dict())
        gnb_pass(m, o, last_n)
        ratio = float(_step_curvature(m, o).sum() / exact.sum())
        assert ratio == pytest.approx(1.0, abs=0.1), (last_n, ratio)


# --- the GNB gradient is never clipped ---

def test_gnb_curvature_does_not_depend_on_max_grad_norm(tmp_path):
    hessians = []
    for clip in (1.0, 1e-4):
        trainer = TrkitTrainer(model=tiny_lm(), args=_args(tmp_path / str(clip), max_steps=1, save_strategy="no",
                                                          max_grad_norm=clip),
                               train_dataset=ListDataset(_rows(8)), sophia=SophiaConfig(k=3))
        trainer.train()  # the warm-start pass before step 1 is the only one: h is its estimate
        assert [s.global_step for s in trainer.hessian_schedule.history] == [0]
        hessians.append(_hessians(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer))
    assert all(float(h.abs().sum()) > 0 for h in hessians[0])
    for a, b in zip(*hessians):
        assert torch.equal(a, b)


# --- the pass is noiseless (no dropout, no NEFTune) but stays in train mode ---

def _lora_with_noise(seed=0):
    from peft import LoraConfig, get_peft_model

    from trkit.neftune import activate_neftune

    base = tiny_lm(seed)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    activate_neftune(model, alpha=15.0)
    return model


def test_gnb_pass_is_noiseless_and_keeps_train_mode_and_gradient_checkpointing():
    batch = make_batches(1)[0]
    model = _lora_with_noise()
    # reference: the same model's deterministic function (eval mode: no dropout, no NEFTune, no checkpointing)
    model.eval()
    ref_opt = SophiaG([p for p in model.parameters() if p.requires_grad])
    run_gnb_pass(model, batch, ref_opt, initialize=True, deterministic=False, generator=torch.Generator().manual_seed(0))

    model.train()
    mlp = model.base_model.model.model.layers[0].mlp  # inside the checkpointed layer
    calls = []
    mlp_forward = mlp.forward

    def counted(*args, **kwargs):  # (forward hooks do not fire in checkpoint's recomputation: count calls)
        calls.append(mlp.training)
        return mlp_forward(*args, **kwargs)

    mlp.forward = counted
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    opt = SophiaG([p for p in model.parameters() if p.requires_grad])
    run_gnb_pass(model, batch, opt, initialize=True, generator=torch.Generator().manual_seed(0))
    del mlp.forward
    assert calls == [True, True]  # train mode, and the checkpointed layer re-ran its forward in the backward
    for a, b in zip(_hessians(ref_opt), _hessians(opt)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    # everything is back: dropout p, and NEFTune noise in training
    assert model.training and all(m.p == 0.5 for m in dropouts)
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        noisy = model.get_input_embeddings()(batch["input_ids"])
        clean = torch.nn.functional.embedding(batch["input_ids"], embeddings.weight)
    assert not torch.allclose(noisy, clean)

    # and the same pass with the noise left on is a different estimate (what the default avoids)
    noisy_opt = SophiaG([p for p in model.parameters() if p.requires_grad])
    run_gnb_pass(model, batch, noisy_opt, initialize=True, deterministic=False, generator=torch.Generator().manual_seed(0))
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(_hessians(ref_opt), _hessians(noisy_opt)))


def test_curvature_forward_zeroes_hf_attention_dropout_and_transformers_neftune():
    model = tiny_lm(attention_dropout=0.3)
    attention = model.model.layers[0].self_attn
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = 5.0  # what transformers' Trainer sets for its own NEFTune hook
    with curvature_forward(model):
        assert attention.attention_dropout == 0.0 and embeddings.neftune_noise_alpha == 0.0
        assert model.training
    assert attention.attention_dropout == 0.3 and embeddings.neftune_noise_alpha == 5.0


# --- a loss_fn replaces "forward + GNB loss on the logits" ---

def test_loss_fn_hook_is_used_with_the_schedules_generator():
    model = tiny_lm()
    model.train()
    seen = []

    def chunked_gnb_loss(m, inputs, generator):
        """GNB loss from hidden states, one sequence chunk at a time (no full logits), as a training stage does."""
        seen.append(m.model.layers[0].mlp.act_fn is not None)
        hidden = m.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        total, n = 0.0, 0
        for start in range(0, LENGTH, 4):
            stop = min(start + 5, LENGTH)  # one token of overlap: the chunk's last position only labels the previous one
            logits = m.lm_head(hidden[:, start:stop])
            loss, k = gauss_newton_bartlett_loss(logits, inputs["labels"][:, start:stop], generator=generator)
            total, n = total + loss * k, n + k
        return total / n, n

    opt = SophiaG(model.parameters())
    schedule = HessianSchedule(opt, k=5, seed=7)
    batch = make_batches(1)[0]
    stats = schedule.maybe_update(model, batch, 0, loss_fn=chunked_gnb_loss)
    assert seen == [True] and stats.positions == 2 * (LENGTH - 3) and stats.initialized

    # h is exactly n * g_hat**2 of that loss with the schedule's generator for step 0
    loss, n = chunked_gnb_loss(model, batch, schedule.generator("cpu", 0))
    loss.backward()
    for p in model.parameters():
        assert torch.allclose(opt.state[p]["hessian"], n * p.grad**2, rtol=1e-5, atol=1e-12)
    model.zero_grad(set_to_none=True)

    with pytest.raises(ValueError, match="loss_fn must return"):
        run_gnb_pass(model, batch, opt, loss_fn=lambda m, b, g: (m(**{"input_ids": b["input_ids"]}).logits.sum(), 0))
    assert all(p.grad is None for p in model.parameters())


# --- Trainer and plain loops ---

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
    assert all(h["sophia/gnb_positions"] == 2 * (LENGTH - 3) for h in logged)

    # resume at step 6, a multiple of k: the pass for step 6 must run after the resume, as it did in `full`
    resumed = TrkitTrainer(model=tiny_lm(seed=1), args=_args(tmp_path / "b"), train_dataset=data, sophia=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert [s.global_step for s in resumed.hessian_schedule.history] == [6]
    assert not resumed.hessian_schedule.history[0].initialized  # the EMA came back with the optimizer state
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_trainer_with_another_optimizer_runs_no_gnb_pass(tmp_path):
    trainer = TrkitTrainer(model=tiny_lm(), args=_args(tmp_path, max_steps=2, save_strategy="no"),
                           train_dataset=ListDataset(_rows(8)))
    trainer.train()
    assert trainer.hessian_schedule is None
    assert not any("sophia/win_rate" in h for h in trainer.state.log_history)


def _plain_loop(scaler=None, steps=6, k=2, fp16=False):
    """SophiaG + HessianSchedule in a plain loop; fp16: CPU autocast to float16 for every forward."""
    model = tiny_lm()
    opt = SophiaG(model.parameters(), lr=1e-2, rho=0.05)
    schedule = HessianSchedule(opt, k=k, seed=0)
    context = (lambda: torch.autocast("cpu", dtype=torch.float16)) if fp16 else contextlib_null
    skipped_steps = []
    for step, batch in enumerate(make_batches(steps)):
        schedule.maybe_update(model, batch, step, scaler=scaler, forward_context=context)
        with context():
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:
                skipped_steps.append(step)
        opt.zero_grad(set_to_none=True)
    return model, opt, schedule, skipped_steps


def contextlib_null():
    import contextlib

    return contextlib.nullcontext()


def test_plain_loop_grad_scaler_path_matches_unscaled_in_fp32():
    ref_model, ref_opt, ref_sched, _ = _plain_loop()
    model, opt, sched, skipped = _plain_loop(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert [s.global_step for s in sched.history] == [0, 2, 4] == [s.global_step for s in ref_sched.history]
    assert not any(s.skipped for s in sched.history) and not skipped
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(ref_opt.state[p]["hessian"], opt.state[q]["hessian"], rtol=1e-5, atol=1e-12)


def test_fp16_autocast_loop_skips_an_overflow_and_seeds_h_with_the_next_pass():
    """fp16 autocast forwards; the scale 2**40 overflows fp16 at step 0: that GNB pass and that training step
    are skipped, the scaler backs off to 2**12, and the run then equals one that never had step 0."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-28, growth_interval=1000)
    model, opt, sched, skipped = _plain_loop(scaler=scaler, fp16=True)
    assert skipped == [0] and scaler.get_scale() == 2.0**12
    assert [(s.global_step, s.skipped, s.initialized) for s in sched.history] == [(0, True, False), (2, False, True),
                                                                                    (4, False, False)]

    # the same run, with the scale it backed off to, in which step 0 never happened
    ref = tiny_lm()
    ref_opt = SophiaG(ref.parameters(), lr=1e-2, rho=0.05)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    for step, batch in enumerate(make_batches(6)):
        if step == 0:
            continue
        if step % 2 == 0:
            run_gnb_pass(ref, batch, ref_opt, initialize=(step == 2), scaler=ref_scaler, forward_context=fp16,
                         generator=sched.generator("cpu", step))
        with fp16():
            loss = ref(**batch).loss
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
    for p, q in zip(ref.parameters(), model.parameters()):
        assert bool(torch.isfinite(q).all())
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
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


def test_gnb_pass_refuses_accumulated_gradients_and_scales_h_by_its_positions():
    model = tiny_lm()
    opt = SophiaG(model.parameters(), bs=5120)
    batch = make_batches(1)[0]
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="already accumulated"):
        run_gnb_pass(model, batch, opt)
    opt.zero_grad(set_to_none=True)
    stats = run_gnb_pass(model, batch, opt, initialize=True, generator=torch.Generator().manual_seed(0))
    assert stats.positions == 2 * (LENGTH - 3)
    assert all(g["bs"] == 5120 for g in opt.param_groups)  # the pass's own n is used, the constant bs is untouched
    loss, n = gauss_newton_bartlett_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                         batch["labels"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    for p in model.parameters():
        assert torch.allclose(opt.state[p]["hessian"], n * p.grad**2, rtol=1e-5, atol=1e-12)


def test_non_finite_gnb_pass_is_skipped_without_a_scaler_too():
    model = tiny_lm()
    opt = SophiaG(model.parameters())
    batch = make_batches(1)[0]
    run_gnb_pass(model, batch, opt, initialize=True, generator=torch.Generator().manual_seed(0))
    before = _hessians(opt)

    def diverged(m, inputs, generator):  # what a bf16 run that blew up hands the pass
        loss, n = gauss_newton_bartlett_loss(m(input_ids=inputs["input_ids"]).logits, inputs["labels"], generator=generator)
        return loss * float("inf"), n

    stats = run_gnb_pass(model, batch, opt, loss_fn=diverged, generator=torch.Generator().manual_seed(1))
    assert stats.skipped and not stats.initialized
    assert all(torch.equal(a, b) for a, b in zip(before, _hessians(opt)))
    assert all(p.grad is None for p in model.parameters())
