"""The DIM model variants, the losses and the negative samplers (dimkit.model, .losses, .negatives)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimkit import losses, model, negatives
from dimkit.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b=6, d=16, seed=0, image_ok=None, cue_ok=None):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(b, d, generator=g) * 3 for k in model.INPUTS}
    out["image_ok"] = torch.ones(b, dtype=torch.bool) if image_ok is None else torch.as_tensor(image_ok)
    out["cue_ok"] = torch.ones(b, dtype=torch.bool) if cue_ok is None else torch.as_tensor(cue_ok)
    return out


# ---------------------------------------------------------------- losses


def _released_npair(anchors, positives, negatives, l2_reg=0.02):
    """The released code's tensor operations, line by line (nel_model/triplet_loss.py)."""
    a = anchors.unsqueeze(1)  # (n, 1, d)
    p = positives.unsqueeze(1)  # (n, 1, d)
    x = torch.matmul(a, (negatives - p).transpose(1, 2))  # (n, 1, n): the (B,D)-(B,1,D) broadcast
    x = torch.sum(torch.exp(x), 2)
    npair = torch.mean(torch.log(1 + x))
    l2 = torch.sum(anchors ** 2 + positives ** 2) / anchors.shape[0]
    return npair + l2_reg * l2


def test_npair_matches_hand_computation_with_shared_negatives():
    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(5, 8, generator=g) * 0.5 for _ in range(3))
    # by hand, with explicit loops: anchor i sees the negatives of every sample j, its own included
    total = 0.0
    for i in range(5):
        s = sum(math.exp(float(q[i] @ n[j] - q[i] @ p[i])) for j in range(5))
        total += math.log(1 + s)
    l2 = sum(float(q[i] @ q[i] + p[i] @ p[i]) for i in range(5)) / 5
    expected = total / 5 + 0.02 * l2
    assert losses.npair_loss(q, p, n).item() == pytest.approx(expected, rel=1e-5)
    assert losses.npair_loss(q, p, n).item() == pytest.approx(_released_npair(q, p, n).item(), rel=1e-5)


def test_npair_uses_dot_products_not_cosine_and_is_stable():
    g = torch.Generator().manual_seed(2)
    q, p, n = (torch.randn(4, 8, generator=g) for _ in range(3))
    assert losses.npair_loss(q * 2, p, n, l2_reg=0).item() != pytest.approx(
        losses.npair_loss(q, p, n, l2_reg=0).item())
    big = losses.npair_loss(q * 1e3, p * 1e3, n * 1e3, l2_reg=0)  # the naive exp overflows here
    assert torch.isfinite(big)


def test_npair_with_k_negatives_per_sample():
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    n = torch.randn(3, 2, 4, generator=g)
    expected = np.mean([math.log(1 + sum(math.exp(float(q[i] @ n[i, k] - q[i] @ p[i])) for k in range(2)))
                        for i in range(3)])
    assert losses.npair_loss(q, p, n, l2_reg=0).item() == pytest.approx(expected, rel=1e-5)


def test_inbatch_npair_is_cross_entropy_over_other_positives():
    g = torch.Generator().manual_seed(4)
    q, p = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    expected = np.mean([math.log(1 + sum(math.exp(float(q[i] @ p[j] - q[i] @ p[i])) for j in range(4) if j != i))
                        for i in range(4)])
    assert losses.inbatch_npair_loss(q, p).item() == pytest.approx(expected, rel=1e-5)
    # a second sample with the same gold is not a negative
    labels = torch.tensor([0, 0, 1, 2])
    exp_masked = np.mean([math.log(1 + sum(math.exp(float(q[i] @ p[j] - q[i] @ p[i]))
                                           for j in range(4) if j != i and labels[j] != labels[i]))
                          for i in range(4)])
    assert losses.inbatch_npair_loss(q, p, labels=labels).item() == pytest.approx(exp_masked, rel=1e-5)


def test_infonce_uses_cosine_over_temperature():
    g = torch.Generator().manual_seed(5)
    q, p = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    logits = F.normalize(q, dim=1) @ F.normalize(p, dim=1).T / 0.1
    expected = F.cross_entropy(logits, torch.arange(4))
    assert losses.inbatch_npair_loss(q * 7, p, temperature=0.1).item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.compute_loss("infonce", q, p, None, temperature=0.1).item() == pytest.approx(
        expected.item(), rel=1e-5)
    with pytest.raises(ConfigError):
        losses.compute_loss("triplet", q, p, None)
    with pytest.raises(ConfigError):
        losses.compute_loss("npair", q, p, None)


# ---------------------------------------------------------------- model


def test_released_variant_is_spec_e1():
    cfg = model.ModelConfig(variant="released", dim=16, hidden=16, dropout=0.4)
    m = model.build_model(cfg).eval()
    b = _batch()
    lin_c, ln = m.text_trans[0], m.text_trans[2]
    expected = m.out[1](b["mention"] + b["mention_sentence"] + b["image"]
                        + ln(torch.relu(lin_c(b["cue"]))))
    torch.testing.assert_close(m(b), expected)
    q, w = m(b, return_attention=True)
    assert w is None and q.shape == (6, 16)


def test_released_variant_works_without_cues_and_masks_unusable_inputs():
    cfg = model.ModelConfig(variant="released", dim=16, hidden=16)
    m = model.build_model(cfg).eval()
    b = _batch(cue_ok=[False] * 6, image_ok=[True, False, True, True, True, True])
    b["cue"] = torch.zeros_like(b["cue"])  # WikiDiverse: no cue at all
    expected = m.out[1](b["mention"] + b["mention_sentence"] + b["image"] * b["image_ok"][:, None])
    torch.testing.assert_close(m(b), expected)
    no_cue = model.build_model(model.ModelConfig.from_ablation("no_cue", variant="released", dim=16, hidden=16))
    assert not no_cue.cfg.use_cue and no_cue.eval()(b).shape == (6, 16)
    with pytest.raises(ConfigError):
        model.ModelConfig.from_ablation("no_attention", variant="released")
    with pytest.raises(ConfigError):
        model.build_model(model.ModelConfig(variant="released", dim=16, hidden=32))


def test_paper_attention_depends_on_the_query_only_with_several_keys():
    cfg = model.ModelConfig(variant="paper", dim=16, hidden=16, heads=4, dropout=0.0)
    torch.manual_seed(0)
    m = model.build_model(cfg)
    b = _batch()
    assert m.key_names == ["mention_sentence", "image", "cue"]
    assert model.attention_depends_on_query(m, b)  # three keys: the weights matter
    assert not model.attention_depends_on_query(m, b, key_count=1)  # one key: weight 1, query-independent


def test_paper_exposes_attention_weights_and_masks_unusable_keys():
    cfg = model.ModelConfig(variant="paper", dim=16, hidden=16, heads=4)
    m = model.build_model(cfg).eval()
    b = _batch(image_ok=[True, False, True, False, True, True], cue_ok=[True, True, False, False, True, True])
    q, w = m(b, return_attention=True)
    assert q.shape == (6, 16) and w.shape == (6, 4, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(6, 4))
    assert torch.all(w[1, :, 1] == 0) and torch.all(w[3, :, 1] == 0)  # no usable image
    assert torch.all(w[2, :, 2] == 0) and torch.all(w[3, :, 2] == 0)  # no cue
    assert torch.all(w[0] > 0)
    # a masked image changes nothing, whatever its vector holds
    b2 = dict(b, image=b["image"].clone())
    b2["image"][1] = 1e3
    torch.testing.assert_close(m(b2)[1], q[1])


def test_ablations_switch_inputs():
    abl = model.ModelConfig.from_ablation
    assert model.build_model(abl("text_only", variant="paper", dim=16, hidden=16, heads=4)).key_names == [
        "mention_sentence"]
    assert model.build_model(abl("no_image", variant="paper", dim=16, hidden=16, heads=4)).key_names == [
        "mention_sentence", "cue"]
    na = model.build_model(abl("no_attention", variant="paper", dim=16, hidden=16, heads=4)).eval()
    q, w = na(_batch(), return_attention=True)
    assert w is None and torch.isfinite(q).all()
    assert model.parse_ablation("no_cue, original_descriptions") == ("no_cue", "original_descriptions")
    assert model.parse_ablation("none") == ()
    with pytest.raises(ConfigError, match="unknown ablation"):
        model.parse_ablation("no_text")
    with pytest.raises(ConfigError):
        model.ModelConfig.from_ablation(None, variant="fancy")


def test_paper_model_separate_projections_and_gradients_reach_all_inputs():
    cfg = model.ModelConfig(variant="paper", dim=16, hidden=32, heads=8, separate_projections=True, dropout=0.0)
    m = model.build_model(cfg)
    b = _batch()
    for k in model.INPUTS:
        b[k].requires_grad_(True)
    m(b).pow(2).sum().backward()
    for k in model.INPUTS:
        assert b[k].grad is not None and b[k].grad.abs().sum() > 0, k


# ---------------------------------------------------------------- negatives


def test_tokenize_and_stop_list():
    toks = negatives.tokenize("Ada Lovelace [SEP]. Occupation: mathematician, writer's friend")
    assert toks[:4] == ["Ada", "Lovelace", "[", "SEP"]
    kept = [t for t in toks if t not in negatives.STOP_TOKENS]
    assert "Occupation" not in kept and ":" not in kept and "writer's" in kept
    assert negatives.fact_text("X", None) == "X [SEP]. None"


def test_tfidf_weights_follow_gensim_defaults():
    texts = ["alpha beta beta", "alpha gamma", "alpha beta delta"]
    s = negatives.TfidfNegativeSampler(texts)
    # entity 0: tf beta=2, idf beta=log2(3/2); alpha is in every text -> weight 0 and dropped
    w_beta = 2 * math.log2(3 / 2)
    assert s.token_weights(0) == {"beta": int(100 * 1.0)}  # the only weighted token: unit norm
    wd, wb = math.log2(3), math.log2(3 / 2)
    norm = math.hypot(wd, wb)
    assert s.token_weights(2) == {"beta": int(100 * wb / norm), "delta": int(100 * wd / norm)}
    assert w_beta > 0


def test_tfidf_sampler_never_returns_the_gold_and_prefers_shared_tokens():
    texts = ["red apple fruit", "red cherry fruit", "green apple", "blue whale sea", "grey whale sea",
             "violet"]
    s = negatives.TfidfNegativeSampler(texts)
    rng = np.random.default_rng(0)
    gold = np.zeros(4000, dtype=np.int64)  # "red apple fruit"
    neg = s.sample(gold, rng)
    assert neg.shape == (4000,) and not np.any(neg == gold)
    c = Counter(neg.tolist())
    # entities sharing a token with the gold (1: red/fruit, 2: apple) dominate the draws
    assert (c[1] + c[2]) / 4000 > 0.9
    # an entity whose tokens occur nowhere else still gets (uniform) negatives, no endless loop
    lonely = s.sample(np.full(200, 5), rng)
    assert not np.any(lonely == 5)
    many = s.sample(np.array([0, 3]), rng, k=3)
    assert many.shape == (2, 3) and not np.any(many == np.array([[0], [3]]))


def test_random_and_candidate_samplers():
    rng = np.random.default_rng(0)
    r = negatives.RandomNegativeSampler(5).sample(np.arange(5).repeat(100), rng)
    assert not np.any(r == np.arange(5).repeat(100)) and set(r.tolist()) == set(range(5))
    c = negatives.CandidateNegativeSampler([[1, 2], [0], []], num_entities=10)
    out = c.sample(np.array([1, 0, 4] * 50), rng, rows=np.array([0, 1, 2] * 50))
    assert set(out[0::3].tolist()) == {2}  # only non-gold candidate of row 0
    assert all(x != 0 for x in out[1::3])  # row 1 holds only its gold: uniform fallback
    assert all(x != 4 for x in out[2::3])
    with pytest.raises(ConfigError):
        negatives.RandomNegativeSampler(1)
