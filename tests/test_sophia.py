"""SophiaG (trkit.sophia): the update rule by hand, the GNB estimator against the exact Gauss-Newton diagonal."""

from __future__ import annotations

import pytest
import torch

from trkit.sophia import SophiaG, gauss_newton_bartlett_loss


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _set_grad(p, values):
    p.grad = torch.tensor(values, dtype=p.dtype)


def test_one_step_by_hand():
    p = _param([1.0, -2.0, 0.5])
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.9), rho=1.0, weight_decay=0.1, bs=2)
    _set_grad(p, [2.0, 0.1, 1.0])  # a GNB gradient g_hat
    opt.init_hessian()  # h = g_hat**2 = [4, 0.01, 1]
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([4.0, 0.01, 1.0], dtype=torch.float64))
    assert opt.state[p]["hessian"].dtype == torch.float64  # never below the parameter's precision

    _set_grad(p, [0.4, -0.3, 0.0])
    opt.step()
    # decay:   p * (1 - 0.1 * 0.1)              = [0.99, -1.98, 0.495]
    # m:       0.5 * 0 + 0.5 * g                = [0.2, -0.15, 0]
    # denom:   rho * bs * h                      = [8, 0.02, 2]
    # ratio:   min(|m| / denom, 1)               = [0.025, 1 (clipped), 0]
    # p:       p - 0.1 * sign(m) * ratio         = [0.9875, -1.88, 0.495]
    assert torch.allclose(p.detach(), torch.tensor([0.9875, -1.88, 0.495], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.2, -0.15, 0.0], dtype=torch.float64))
    assert opt.state[p]["step"].item() == 1
    assert opt.win_rate() == pytest.approx(2 / 3)  # 0.2 < 8 and 0 < 2 unclipped; 0.15 > 0.02 clipped

    opt.step()  # same gradient again
    # decay [0.977625, -1.8612, 0.49005]; m = [0.3, -0.225, 0]; ratio = [0.0375, 1, 0]
    assert torch.allclose(p.detach(), torch.tensor([0.973875, -1.7612, 0.49005], dtype=torch.float64), atol=1e-7)

    _set_grad(p, [1.0, 1.0, 1.0])
    opt.update_hessian()  # h = 0.9 h + 0.1 g**2
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([3.7, 0.109, 1.0], dtype=torch.float32).double(), atol=1e-6)


def test_zero_hessian_is_a_sign_step():
    p = _param([0.0, 0.0])
    opt = SophiaG([p], lr=0.01, weight_decay=0.0)
    _set_grad(p, [1e-6, -3.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.01, 0.01], dtype=torch.float64))
    assert opt.win_rate() == 0.0


def test_hessian_state_is_fp32_for_half_params():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = SophiaG([p])
    p.grad = torch.full((4,), 1e-5, dtype=torch.float16)
    opt.update_hessian()
    h = opt.state[p]["hessian"]
    assert h.dtype == torch.float32
    assert torch.allclose(h, torch.full((4,), 0.01 * 1e-10), rtol=1e-2)  # 1e-12: zero in fp16, kept in fp32
    opt.step()
    assert p.dtype == torch.float16 and bool(torch.isfinite(p).all())


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(1.0, 0.99)), dict(betas=(0.9, -0.1)),
                                    dict(rho=-0.1), dict(weight_decay=-1.0), dict(bs=0)])
def test_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SophiaG([_param([1.0])], **kwargs)


def test_defaults_follow_the_reference():
    opt = SophiaG([_param([1.0])])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["rho"], group["weight_decay"], group["bs"]) == (1e-4, (0.965, 0.99), 0.04, 0.1, 5120)


def test_gnb_mean_matches_exact_gauss_newton_diagonal():
    """E[N * g_hat**2] equals the Gauss-Newton diagonal of the mean cross-entropy of a softmax regression."""
    torch.manual_seed(0)
    n, d, c = 6, 3, 4
    x = torch.randn(n, d, dtype=torch.float64)
    model = torch.nn.Linear(d, c, dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)  # (n, c)
        curv = probs * (1 - probs)  # diagonal of diag(p) - p p^T per sample
        exact_w = (curv.T @ (x**2)) / n  # d^2 L / dW[c, j]^2 (Gauss-Newton = Hessian for a linear model)
        exact_b = curv.mean(0)
    gen = torch.Generator().manual_seed(1)
    draws = 6000
    acc_w = torch.zeros_like(model.weight)
    acc_b = torch.zeros_like(model.bias)
    for _ in range(draws):
        model.zero_grad()
        loss, positions = gauss_newton_bartlett_loss(model(x), shift=False, generator=gen)
        loss.backward()
        acc_w += positions * model.weight.grad**2
        acc_b += positions * model.bias.grad**2
    assert positions == n
    est_w, est_b = acc_w / draws, acc_b / draws
    # Each coordinate's N*g_hat**2 has a relative std of about sqrt(2): over 6000 draws about 2 %.
    assert torch.allclose(est_w, exact_w, rtol=0.1, atol=0)
    assert torch.allclose(est_b, exact_b, rtol=0.1, atol=0)
    # And it is not the squared true gradient (Bartlett needs the model's own samples, not data labels).
    assert not torch.allclose(est_w, torch.zeros_like(est_w))


def test_gnb_loss_uses_only_labelled_positions_and_shifts():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [1, 2, -100, -100, -100]])
    loss, n = gauss_newton_bartlett_loss(logits, labels, generator=torch.Generator().manual_seed(0))
    # shifted: logits at t predict labels[t+1]; labelled targets at (0,2),(0,3),(0,4),(1,1) -> logits at (0,1),(0,2),(0,3),(1,0)
    assert n == 4
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, 1:4] = True
    expected[1, 0] = True
    assert torch.equal(touched, expected)
    # attention mask instead of labels: every kept position but the last predicts something
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    _, n_mask = gauss_newton_bartlett_loss(logits, attention_mask=mask)
    assert n_mask == 2 + 4
    with pytest.raises(ValueError, match="no labelled positions"):
        gauss_newton_bartlett_loss(logits, torch.full((2, 5), -100))


def test_gnb_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(3, 9, 50)
    a, _ = gauss_newton_bartlett_loss(logits, generator=torch.Generator().manual_seed(5))
    b, _ = gauss_newton_bartlett_loss(logits, generator=torch.Generator().manual_seed(5))
    c, _ = gauss_newton_bartlett_loss(logits, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def _train(model, opt, steps, start=0, k=3):
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(0)
    data = [torch.randn(8, 5, generator=torch.Generator().manual_seed(1000 + i)) for i in range(steps + start)]
    for step in range(start, start + steps):
        x = data[step]
        if step % k == 0:
            loss, n = gauss_newton_bartlett_loss(model(x), shift=False, generator=torch.Generator().manual_seed(step))
            loss.backward()
            opt.param_groups[0]["bs"] = n
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
        target = (x.sum(-1) > 0).long()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del gen


def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        return model, SophiaG(model.parameters(), lr=1e-2, rho=0.05)

    ref_model, ref_opt = fresh()
    _train(ref_model, ref_opt, 10)

    model, opt = fresh()
    _train(model, opt, 5)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2 = fresh()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.param_groups[0]["bs"] == opt.param_groups[0]["bs"]
    for p in model2.parameters():
        assert opt2.state[p]["hessian"].dtype == torch.float32
    _train(model2, opt2, 5, start=5)
    for a, b in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
