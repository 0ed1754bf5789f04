"""CLIP-weighted label-smoothed cross entropy (METHODS.md section 5) against independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from pcmnet.train.losses import clip_pair_weights, weighted_label_smoothed_ce

PAD = -100


def batch(B=4, L=6, V=13, seed=0, pad=PAD):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 2
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[0, 4:] = pad
    targets[2, 2:] = pad
    return logits, targets


def loop_loss(logits, targets, weights, pad, eps, gamma):
    """The formula written out token by token with python floats."""
    B, L, V = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(L):
            y = int(targets[b, t])
            if y == pad:
                continue
            row = [float(v) for v in logits[b, t]]
            mx = max(row)
            logz = mx + math.log(sum(math.exp(v - mx) for v in row))
            logp = [v - logz for v in row]
            loss = (1 - eps) * -logp[y] + eps * sum(-lp for lp in logp) / V
            loss *= (1 - math.exp(logp[y])) ** gamma
            total += loss * (1.0 if weights is None else float(weights[b]))
            count += 1
    return total / count


def test_clip_pair_weights():
    cos = torch.tensor([-0.3, 0.0, 0.1, 0.2, 0.4, 0.9])
    assert torch.allclose(clip_pair_weights(cos), torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0]))
    assert torch.allclose(clip_pair_weights(cos, alpha=1.0), torch.tensor([0, 0, 0.1, 0.2, 0.4, 0.9]))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_the_per_token_formula(eps, gamma):
    logits, targets = batch()
    w = torch.tensor([0.25, 1.0, 0.6, 0.0])
    got = weighted_label_smoothed_ce(logits, targets, w, PAD, smoothing=eps, focal_gamma=gamma)
    assert got.item() == pytest.approx(loop_loss(logits, targets, w, PAD, eps, gamma), rel=1e-5)


def test_mean_is_over_tokens_not_weights():
    logits, targets = batch()
    full = weighted_label_smoothed_ce(logits, targets, None, PAD)
    half = weighted_label_smoothed_ce(logits, targets, torch.full((4,), 0.5), PAD)
    assert half.item() == pytest.approx(0.5 * full.item(), rel=1e-6)


@pytest.mark.parametrize("pad", [PAD, 0])
def test_all_ones_is_plain_label_smoothing(pad):
    logits, targets = batch(pad=pad, seed=3)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad,
                               label_smoothing=0.1)
    for w in (None, torch.ones(4)):
        got = weighted_label_smoothed_ce(logits, targets, w, pad, smoothing=0.1)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_gradient_matches_plain_label_smoothing():
    logits, targets = batch(seed=5)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    weighted_label_smoothed_ce(a, targets, torch.ones(4), PAD).backward()
    F.cross_entropy(b.flatten(0, 1), targets.flatten(), ignore_index=PAD, label_smoothing=0.1).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert a.grad[0, 4:].abs().sum() == 0  # pad positions get no gradient


def test_focal_term_down_weights_easy_tokens():
    # one confident-correct token and one wrong token: the focal term shrinks the easy one most
    logits = torch.tensor([[[6.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    targets = torch.tensor([[0, 0]])
    plain = [weighted_label_smoothed_ce(logits[:, i:i + 1], targets[:, i:i + 1], None, PAD, 0.0)
             for i in range(2)]
    focal = [weighted_label_smoothed_ce(logits[:, i:i + 1], targets[:, i:i + 1], None, PAD, 0.0, 2.0)
             for i in range(2)]
    p_easy = torch.softmax(logits[0, 0], -1)[0]
    assert focal[0].item() == pytest.approx(plain[0].item() * (1 - p_easy.item()) ** 2, rel=1e-5)
    assert focal[0] / plain[0] < focal[1] / plain[1]


def test_all_padding_gives_zero_not_nan():
    logits, _ = batch()
    targets = torch.full((4, 6), PAD)
    loss = weighted_label_smoothed_ce(logits.requires_grad_(True), targets, torch.ones(4), PAD)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
