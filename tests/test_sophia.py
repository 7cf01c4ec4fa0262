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
    opt.init_hessian()  # h = bs * g_hat**2 = [8, 0.02, 2] (no positions given: the group's bs)
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([8.0, 0.02, 2.0], dtype=torch.float64))
    assert opt.state[p]["hessian"].dtype == torch.float64  # never below the parameter's precision

    _set_grad(p, [0.4, -0.3, 0.0])
    opt.step()
    # decay:   p * (1 - 0.1 * 0.1)              = [0.99, -1.98, 0.495]
    # m:       0.5 * 0 + 0.5 * g                = [0.2, -0.15, 0]
    # denom:   rho * h                           = [8, 0.02, 2]
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
    opt.update_hessian()  # h = 0.9 h + 0.1 * bs * g**2
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([7.4, 0.218, 2.0], dtype=torch.float64), atol=1e-12)
    opt.update_hessian(positions=10)  # this estimate averaged 10 positions: h = 0.9 h + 0.1 * 10 * g**2
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([7.66, 1.1962, 2.8], dtype=torch.float64), atol=1e-12)
    assert opt.param_groups[0]["bs"] == 2  # an explicit n never changes the group's constant bs


def test_constant_bs_reproduces_the_reference_update():
    """update_hessian() with the group's constant bs gives the released code's trajectory: h_ref = EMA(g_hat**2),
    steps divide by rho * bs * h_ref (written out here from the reference's formulas)."""
    torch.manual_seed(0)
    bs, lr, rho, (b1, b2), wd = 384, 3e-3, 0.04, (0.965, 0.99), 0.1
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = SophiaG([p], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, bs=bs)
    q, m, h_ref = p.detach().clone(), torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for step in range(40):
        if step % 5 == 0:
            g_hat = torch.randn(50, dtype=torch.float64) / bs**0.5  # a mean over bs positions
            p.grad = g_hat.clone()
            opt.update_hessian()
            h_ref = b2 * h_ref + (1 - b2) * g_hat * g_hat
        g = 0.02 * torch.randn(50, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        q = q * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        q = q - lr * m.sign() * (m.abs() / (rho * bs * h_ref + 1e-15)).clamp(max=1)
    assert torch.allclose(p.detach(), q, rtol=1e-12, atol=1e-12)
    assert 0.05 < opt.win_rate() < 0.95  # both branches of the clip took part


@pytest.mark.parametrize("positions", [0, -3, 1.5, True, "128"])
def test_update_hessian_rejects_bad_positions(positions):
    p = _param([1.0])
    opt = SophiaG([p])
    _set_grad(p, [1.0])
    with pytest.raises(ValueError, match="label positions"):
        opt.update_hessian(positions)
    with pytest.raises(ValueError, match="label positions"):
        opt.init_hessian(positions)


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


def test_gnb_gradient_outer_product_is_the_exact_gauss_newton_matrix():
    """E[N g_hat g_hat^T] over the GNB loss's own label draws = the Gauss-Newton matrix of the mean CE.

    Softmax regression, where GN = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i is exact. The same
    statistic with other labels - the data's true labels, or uniformly drawn ones - lands far outside the
    tolerance, so the match shows the labels come from softmax(logits) of the model itself."""
    torch.manual_seed(0)
    n, d, c = 6, 3, 4
    x = torch.randn(n, d, dtype=torch.float64)
    weight = 4.0 * torch.randn(c, d, dtype=torch.float64)  # confident, non-uniform predictions
    bias = torch.randn(c, dtype=torch.float64)
    logits = x @ weight.T + bias
    probs = torch.softmax(logits, dim=-1)  # (n, c)
    jacobians = [torch.cat([torch.kron(torch.eye(c, dtype=torch.float64), x[i][None]),  # dz/dW (row-major W)
                            torch.eye(c, dtype=torch.float64)], dim=1) for i in range(n)]  # dz/db
    gn = sum(j.T @ (torch.diag(p) - torch.outer(p, p)) @ j for j, p in zip(jacobians, probs)) / n

    def second_moment(logit_grads):
        """N * mean over draws of g g^T, g = J^T (dL/dz) the parameter gradient of each draw's mean CE."""
        per_draw = torch.cat([torch.einsum("dnc,nj->dcj", logit_grads, x).flatten(1), logit_grads.sum(1)], dim=1)
        return n * per_draw.T @ per_draw / len(per_draw)

    # Many draws at once: one leaf holding `draws` copies of the logits; the GNB loss averages over all
    # draws * n positions, so draws * dL/dz is each draw's own (p - e_y_hat) / n.
    draws = 20000
    leaf = logits.expand(draws, n, c).clone().requires_grad_(True)
    loss, positions = gauss_newton_bartlett_loss(leaf, shift=False, generator=torch.Generator().manual_seed(1))
    assert positions == draws * n
    loss.backward()
    est = second_moment(leaf.grad * draws)
    diag = torch.diagonal(gn)
    # Each diagonal entry of N g g^T has a relative std of about sqrt(2): over 20000 draws about 1 %.
    assert torch.allclose(torch.diagonal(est), diag, rtol=0.05, atol=0)
    assert torch.allclose(est, gn, rtol=0, atol=0.03 * float(diag.max()))  # cross-position terms average out

    def rel_error(estimate):
        return float(((torch.diagonal(estimate) - diag).abs() / diag).max())

    def ce_logit_grads(labels):  # (draws, n) labels -> each draw's dL/dz of its mean CE
        z = logits.expand(len(labels), n, c).clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(z.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        return z.grad / n

    true_labels = torch.randint(0, c, (1, n), generator=torch.Generator().manual_seed(2))
    uniform_labels = torch.randint(0, c, (draws, n), generator=torch.Generator().manual_seed(3))
    assert rel_error(second_moment(ce_logit_grads(true_labels))) > 0.5  # the true-label gradient's square is not it
    assert rel_error(second_moment(ce_logit_grads(uniform_labels))) > 0.5  # nor labels that are not the model's own


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
            opt.update_hessian(n)
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
