"""The released optimiser (dimkit.optim) against hand-written update formulas and torch's AdamW."""
from __future__ import annotations

import math

import pytest
import torch

from dimkit import model, optim, train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def _problem(seed: int = 0):
    """Two float64 parameters and a quadratic loss whose gradient depends on the weights."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b0 = torch.randn(3, generator=g, dtype=torch.float64)
    target_w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    target_b = torch.randn(3, generator=g, dtype=torch.float64)
    scale = torch.rand(4, 3, generator=g, dtype=torch.float64) * 1e-2  # small gradients: eps matters
    return w0, b0, target_w, target_b, scale


def _grads(w, b, target_w, target_b, scale):
    """Gradient of sum(scale * (w - tw)^2) + sum((b - tb)^2) / 2, written out by hand."""
    return 2.0 * scale * (w - target_w), b - target_b


def _loss(w, b, target_w, target_b, scale):
    return (scale * (w - target_w) ** 2).sum() + ((b - target_b) ** 2).sum() / 2


def _reference(lr, eps, wd, betas=(0.9, 0.999), correct_bias=True, steps=STEPS, seed=0):
    """The transformers 4.x AdamW update on plain tensors; the bias group has no weight decay."""
    w, b, tw, tb, scale = _problem(seed)
    w, b = w.clone(), b.clone()
    b1, b2 = betas
    state = {name: [torch.zeros_like(x), torch.zeros_like(x)] for name, x in (("w", w), ("b", b))}
    for t in range(1, steps + 1):
        gw, gb = _grads(w, b, tw, tb, scale)
        new = {}
        for name, p, g, decay in (("w", w, gw, wd), ("b", b, gb, 0.0)):
            m, v = state[name]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            state[name] = [m, v]
            denom = torch.sqrt(v) + eps
            step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr
            p = p - step_size * m / denom
            if decay > 0:
                p = p - lr * decay * p
            new[name] = p
        w, b = new["w"], new["b"]
    return w, b


def _run(make_opt, steps=STEPS, seed=0, wd=0.0):
    w0, b0, tw, tb, scale = _problem(seed)
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(b0.clone())
    opt = make_opt([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}])
    for _ in range(steps):
        opt.zero_grad()
        _loss(w, b, tw, tb, scale).backward()
        opt.step()
    return w.detach(), b.detach(), opt


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_released_adamw_matches_the_update_formulas(wd, eps):
    lr = 0.05
    w, b, _ = _run(lambda g: optim.ReleasedAdamW(g, lr=lr, eps=eps), wd=wd)
    rw, rb = _reference(lr, eps, wd)
    torch.testing.assert_close(w, rw, rtol=0, atol=1e-13)
    torch.testing.assert_close(b, rb, rtol=0, atol=1e-13)
    w0, b0, *_ = _problem()
    assert not torch.allclose(w, w0)  # it did move


def test_released_adamw_without_bias_correction_and_gradless_parameters():
    lr, eps = 0.05, 1e-6
    w, b, opt = _run(lambda g: optim.ReleasedAdamW(g, lr=lr, eps=eps, correct_bias=False), wd=0.1)
    rw, rb = _reference(lr, eps, 0.1, correct_bias=False)
    torch.testing.assert_close(w, rw, rtol=0, atol=1e-13)
    torch.testing.assert_close(b, rb, rtol=0, atol=1e-13)
    # a parameter without a gradient (the released unused BERT) is left alone, without state
    idle = torch.nn.Parameter(torch.ones(3))
    opt2 = optim.ReleasedAdamW([idle], lr=1.0, weight_decay=0.5)
    opt2.step()
    assert torch.equal(idle.detach(), torch.ones(3)) and len(opt2.state) == 0


def test_released_adamw_differs_from_torch_adamw():
    lr, steps = 0.05, STEPS

    def both(eps, wd):
        ours = _run(lambda g: optim.ReleasedAdamW(g, lr=lr, eps=eps), steps=steps, wd=wd)[0]
        theirs = _run(lambda g: torch.optim.AdamW(g, lr=lr, eps=eps, foreach=False), steps=steps, wd=wd)[0]
        return ours, theirs

    # no epsilon, no decay: the two rules are the same algebra
    ours, theirs = both(0.0, 0.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # epsilon before vs after the bias correction
    ours, theirs = both(1e-3, 0.0)
    assert (ours - theirs).abs().max() > 1e-4
    # decay after vs before the step
    ours, theirs = both(0.0, 0.1)
    assert (ours - theirs).abs().max() > 1e-5


def test_first_step_closed_form():
    # step 1: m_hat = g and v_hat = g^2, so the released step is lr * g / (|g| + eps / sqrt(1 - b2))
    # (torch's is lr * g / (|g| + eps)); the decay then takes lr * wd of the moved weight
    lr, eps, wd, b2 = 0.1, 1e-3, 0.2, 0.999
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    g = torch.tensor([3e-3, -1e-3, 2e-2], dtype=torch.float64)
    p.grad = g.clone()
    optim.ReleasedAdamW([p], lr=lr, eps=eps, weight_decay=wd, betas=(0.9, b2)).step()
    moved = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) - lr * g / (g.abs() + eps / math.sqrt(1 - b2))
    torch.testing.assert_close(p.detach(), moved * (1 - lr * wd), rtol=0, atol=1e-15)


def test_released_adamw_state_dict_round_trip():
    w, b, opt = _run(lambda g: optim.ReleasedAdamW(g, lr=0.05, eps=1e-8), steps=3, wd=0.1)
    sd = opt.state_dict()
    w2 = torch.nn.Parameter(w.clone())
    b2 = torch.nn.Parameter(b.clone())
    opt2 = optim.ReleasedAdamW([{"params": [w2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}],
                               lr=0.05, eps=1e-8)
    opt2.load_state_dict(sd)
    assert opt2.state[w2]["step"] == 3
    torch.testing.assert_close(opt2.state[w2]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_invalid_arguments():
    p = [torch.nn.Parameter(torch.zeros(1))]
    for kw in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1e-8}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            optim.ReleasedAdamW(p, **kw)


def _group_names(m: torch.nn.Module, groups: list[dict]) -> tuple[set, set]:
    names = {id(p): n for n, p in m.named_parameters()}
    return ({names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]})


def test_released_param_groups_decay_layernorm_weights_of_released_model():
    m = model.build_model(model.ModelConfig(variant="released", dim=16, hidden=16, heads=4))
    groups = optim.released_param_groups(m, 1e-3)
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    decay, no_decay = _group_names(m, groups)
    all_names = {n for n, _ in m.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    assert isinstance(m.text_trans[2], torch.nn.LayerNorm)
    assert "text_trans.2.weight" in decay  # the name filter misses the LayerNorm weight
    assert no_decay == {n for n in all_names if n.endswith("bias")}
    # dimkit's own groups exempt the LayerNorm weight too: the only difference
    d_decay, d_no_decay = _group_names(m, train._param_groups(m, 1e-3))
    assert decay - d_decay == {"text_trans.2.weight"} and d_no_decay - no_decay == {"text_trans.2.weight"}


def test_released_param_groups_on_paper_model():
    m = model.build_model(model.ModelConfig(variant="paper", dim=16, hidden=16, heads=4))
    decay, no_decay = _group_names(m, optim.released_param_groups(m, 0.01))
    layer_norm_weights = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert layer_norm_weights and layer_norm_weights <= decay  # f.2.weight, g.2.weight, norm.weight
    assert "modality" in decay and "attn.in_proj_weight" in decay
    assert all("bias" in n for n in no_decay) and "attn.in_proj_bias" in no_decay
    assert optim.released_no_decay("encoder.LayerNorm.weight")  # a BERT-style name is exempt
    assert not optim.released_no_decay("text_trans.2.weight")
