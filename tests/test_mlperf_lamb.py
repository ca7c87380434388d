"""LAMB against the paper's update rule worked out by hand, and the MLPerf parameter groups/schedule."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "mlperf_bert"))
from lamb import Lamb, lamb_param_groups, warmup_poly_lambda  # noqa: E402


def _lamb_by_hand(x, grads, lr, b1, b2, eps, wd, adapt):
    """Plain-Python LAMB (Algorithm 2 with bias correction) on a list of floats."""
    x = list(x)
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - b1**t) for mi in m]
        v_hat = [vi / (1 - b2**t) for vi in v]
        u = [mh / (math.sqrt(vh) + eps) + wd * xi for mh, vh, xi in zip(m_hat, v_hat, x)]
        ratio = 1.0
        if adapt:
            xn = math.sqrt(sum(xi * xi for xi in x))
            un = math.sqrt(sum(ui * ui for ui in u))
            ratio = xn / un if xn > 0 and un > 0 else 1.0
        x = [xi - lr * ratio * ui for xi, ui in zip(x, u)]
    return x


def test_lamb_matches_hand_computed_update():
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.999, 1e-6, 0.1
    w0 = [0.5, -1.25, 2.0, 0.75]
    b0 = [0.1, -0.3]
    gw = [[0.2, -0.1, 0.05, 0.4], [-0.3, 0.25, 0.1, -0.05], [0.01, 0.02, -0.2, 0.3]]
    gb = [[1.0, -2.0], [0.5, 0.25], [-0.75, 0.1]]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    opt = Lamb([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
               lr=lr, betas=(b1, b2), eps=eps)
    for g1, g2 in zip(gw, gb):
        w.grad = torch.tensor(g1, dtype=torch.float64)
        b.grad = torch.tensor(g2, dtype=torch.float64)
        opt.step()
    # The weight gets decay and the trust ratio; the bias neither (MLPerf's exclusion).
    want_w = _lamb_by_hand(w0, gw, lr, b1, b2, eps, wd, adapt=True)
    want_b = _lamb_by_hand(b0, gb, lr, b1, b2, eps, 0.0, adapt=False)
    torch.testing.assert_close(w.detach(), torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), torch.tensor(want_b, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # The hand rule without the trust ratio differs: the comparison above can tell them apart.
    assert max(abs(a - c) for a, c in zip(want_w, _lamb_by_hand(w0, gw, lr, b1, b2, eps, wd, False))) > 1e-3


def test_lamb_trust_ratio_is_one_for_zero_weights():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Lamb([w], lr=0.1, weight_decay=0.01)
    w.grad = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    opt.step()
    want = _lamb_by_hand([0.0] * 3, [[1.0, -1.0, 0.5]], 0.1, 0.9, 0.999, 1e-6, 0.01, adapt=True)
    torch.testing.assert_close(w.detach(), torch.tensor(want, dtype=torch.float64))
    # first Adam step with bias correction is ~sign(g): a step of exactly lr, not zero
    assert abs(abs(w[0].item()) - 0.1) < 1e-5


def test_param_groups_exclude_bias_and_layernorm():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(cfg)
    decay, rest = lamb_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    rest_names = {names[id(p)] for p in rest["params"]}
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert "bert.embeddings.word_embeddings.weight" in decay_names
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay_names
    assert "bert.encoder.layer.0.attention.self.query.bias" in rest_names
    assert "bert.embeddings.LayerNorm.weight" in rest_names
    assert all("bias" not in n and "LayerNorm" not in n for n in decay_names)
    assert len(decay_names) + len(rest_names) == len(names)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_warmup_then_polynomial_decay(power):
    f = warmup_poly_lambda(warmup_steps=10, total_steps=110, power=power)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5**power)
    assert f(110) == 0.0 and f(500) == 0.0
