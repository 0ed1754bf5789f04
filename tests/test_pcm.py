"""PCM (METHODS.md section 3) against hand computations on a tiny example, plus properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from pcmnet.config import ConfigError, from_dict
from pcmnet.errors import CheckpointError
from pcmnet.models.encoder import VisualSemanticEncoder, VisualTokens
from pcmnet.models.pcm import PCMConfig, PCMTokens

# ---------------------------------------------------------------------------------------------
# The tiny example (D=3, K=4, N=3 patches, Dv=2, k=2), chosen so every quantity is easy by hand:
#   concepts: e1, e2, e3, (e1+e2)/sqrt2;  image embedding g = e1
#   -> cosines g.C = [1, 0, 0, 0.7071]: the top-2 concepts are #0 (e1) and #3 ((e1+e2)/sqrt2)
#   patches in the joint space: p1 = e1, p2 ~ (0.1, 1, 0), p3 ~ (0.3, 0, 1)
#   -> S = [[1, 0.7071], [0.0995, 0.7740], [0.2873, 0.2031]]
#   -> top-2 entries (p1,#0)=1 and (p2,#3)=0.774: patches 1 and 2 are replaced, patch 3 is not.
#   With #3 masked (threshold): entries (p1,#0)=1, (p3,#0)=0.287: patches 1 and 3.
R2 = math.sqrt(2)
CONCEPTS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / R2, 1 / R2, 0]])
P_JOINT = [[1.0, 0, 0], [0.1, 1, 0], [0.3, 0, 1]]


def tiny_feats():
    g = torch.tensor([[1.0, 0, 0]])
    patches = torch.tensor([[[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25]]])
    return {"embeds": g, "patches": patches, "patch_embeds": torch.tensor([P_JOINT])}


def tiny_module(**cfg):
    torch.manual_seed(0)
    cfg = {"top_k": 2, "replace_m": 2, "tau": 0.5, **cfg}
    return PCMTokens(PCMConfig(**cfg), CONCEPTS, embed_dim=3, patch_dim=2, num_patches=3, width=8,
                     noise_variance=0.0, dropout=0.0).eval()


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def softmax_list(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_tiny_example_plan_by_hand():
    tau = 0.5
    plan = tiny_module().mix_plan(tiny_feats(), train=False)

    # step 1: q = softmax(g.C / tau) over the 4 concepts, computed with math.exp
    q = softmax_list([cos([1, 0, 0], c) / tau for c in CONCEPTS.tolist()])
    assert torch.allclose(plan.probs[0], torch.tensor(q), atol=1e-6)
    assert plan.concept_ids.tolist() == [[0, 3]]
    assert plan.concept_mask.tolist() == [[True, True]]
    T = [CONCEPTS[0].tolist(), CONCEPTS[3].tolist()]
    assert torch.allclose(plan.concepts[0], torch.tensor(T))

    # step 2: S_ij = cos(p_i, T_j), in a loop
    S = [[cos(p, t) for t in T] for p in P_JOINT]
    assert torch.allclose(plan.similarity[0], torch.tensor(S), atol=1e-6)
    assert abs(S[1][1] - 0.7740) < 1e-4 and abs(S[2][0] - 0.2873) < 1e-4  # the numbers above

    # step 3: A_i = sum_j softmax_j(S_ij / tau) T_j, in a loop
    for i in range(3):
        w = softmax_list([s / tau for s in S[i]])
        A_i = [sum(w[j] * T[j][d] for j in range(2)) for d in range(3)]
        assert torch.allclose(plan.mixture[0, i], torch.tensor(A_i), atol=1e-6)

    # step 4: softmax over the 6 entries; the two largest are (p1,#0) and (p2,#3)
    flat = softmax_list([s / tau for row in S for s in row])
    assert torch.allclose(plan.replace_probs[0].flatten(), torch.tensor(flat), atol=1e-6)
    assert plan.replace.tolist() == [[True, True, False]]


def test_tiny_example_tokens_by_hand():
    """Training X = V*(1-r) + U*r and inference [g; V; U] with U3 masked, rebuilt from the weights."""
    m = tiny_module()
    feats = tiny_feats()
    plan = m.mix_plan(feats, train=False)
    A = plan.mixture[0]
    with torch.no_grad():
        def tok(x, pos, typ):
            return F.layer_norm(x + m.pos.weight[pos] + m.token_type.weight[typ], (8,),
                                m.norm.weight, m.norm.bias, m.norm.eps)

        G = tok(m.global_proj(feats["embeds"][0]), 0, 0)
        V = [m.patch_proj(feats["patches"][0, i]) for i in range(3)]
        U = [m.concept_proj(A[i]) for i in range(3)]

        x, pad = m(feats, train=True)
        expected = [G, tok(U[0], 1, 1), tok(U[1], 2, 1), tok(V[2], 3, 0)]  # patches 1, 2 replaced
        assert x.shape == (1, 4, 8)
        assert torch.allclose(x[0], torch.stack(expected), atol=1e-5)
        assert pad.tolist() == [[False] * 4]

        x, pad = m(feats, train=False)
        expected = [G] + [tok(V[i], i + 1, 0) for i in range(3)] + [tok(U[i], i + 1, 1) for i in range(3)]
        assert x.shape == (1, 7, 8)
        assert torch.allclose(x[0], torch.stack(expected), atol=1e-5)
        assert pad.tolist() == [[False, False, False, False, False, False, True]]


def test_threshold_masks_concepts():
    feats = tiny_feats()
    # tau = 0.01 (the default): q(#3) = exp((0.7071 - 1) / 0.01) / Z ~ 2e-13, far below 0.5
    plan = tiny_module(tau=0.01, threshold=0.5).mix_plan(feats, train=False)
    assert plan.concept_ids.tolist() == [[0, 3]]
    assert plan.concept_mask.tolist() == [[True, False]]
    # the only kept concept is #0, so every patch's mixture is exactly e1
    assert torch.allclose(plan.mixture[0], CONCEPTS[0].expand(3, 3))
    # entries of #0 only: (p1)=1, (p3)=0.287, (p2)=0.0995 -> patches 1 and 3 (without the mask: 1, 2)
    assert plan.replace.tolist() == [[True, False, True]]
    assert tiny_module(tau=0.01).mix_plan(feats, train=False).replace.tolist() == [[True, True, False]]
    assert plan.replace_probs[0, :, 1].abs().sum() == 0

    # nothing kept at all: no mixture, nothing replaced, every concept token masked at inference
    m = tiny_module(threshold=1.0)
    plan = m.mix_plan(feats, train=False)
    assert not plan.concept_mask.any() and not plan.replace.any()
    assert plan.mixture.abs().sum() == 0
    x, pad = m(feats, train=False)
    assert pad.tolist() == [[False] * 4 + [True] * 3] and torch.isfinite(x).all()


def test_replace_m_as_count_and_fraction():
    feats = tiny_feats()
    # M=3 adds (p1,#3)=0.707: patch 1 again, so still 2 patches; M=1: patch 1 only
    assert tiny_module(replace_m=3).mix_plan(feats, False).replace.tolist() == [[True, True, False]]
    assert tiny_module(replace_m=1).mix_plan(feats, False).replace.tolist() == [[True, False, False]]
    assert tiny_module(replace_m=0).mix_plan(feats, False).replace.tolist() == [[False, False, False]]
    # a fraction of the N*k = 6 entries: 0.2 -> round(1.2) = 1 entry, 0.34 -> 2 entries
    assert PCMConfig(replace_m=0.2).num_entries(3, 2) == 1
    assert PCMConfig(replace_m=0.34).num_entries(3, 2) == 2
    assert PCMConfig(replace_m=0.01).num_entries(3, 2) == 1  # a fraction never rounds to nothing
    assert PCMConfig(replace_m=50).num_entries(3, 2) == 6
    assert tiny_module(replace_m=0.34).mix_plan(feats, False).replace.tolist() == [[True, True, False]]


def random_batch(B=6, N=10, D=6, Dv=5, K=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = {"embeds": F.normalize(torch.randn(B, D, generator=g), dim=-1),
             "patches": torch.randn(B, N, Dv, generator=g),
             "patch_embeds": torch.randn(B, N, D, generator=g)}
    return feats, torch.randn(K, D, generator=g)


def test_replace_mask_matches_a_sorted_list_of_entries():
    """Random batch: r equals the patches of the M best (patch, concept) pairs found by sorting
    python lists; the count lies in [ceil(M/k), M]."""
    feats, C = random_batch()
    for M, k in [(5, 5), (3, 2), (7, 3), (1, 4)]:
        cfg = PCMConfig(top_k=k, replace_m=M)
        m = PCMTokens(cfg, C, 6, 5, 10, 16)
        plan = m.mix_plan(feats, train=True)
        for b in range(feats["embeds"].shape[0]):
            entries = sorted(((plan.similarity[b, i, j].item(), i) for i in range(10) for j in range(k)),
                             reverse=True)
            expected = {i for _, i in entries[:M]}
            got = set(torch.nonzero(plan.replace[b]).flatten().tolist())
            assert got == expected
            assert math.ceil(M / k) <= len(got) <= M


def test_random_variant_replaces_a_fixed_fraction():
    feats, C = random_batch(B=8, N=20)
    m = PCMTokens(PCMConfig(variant="random", random_fraction=0.25), C, 6, 5, 20, 16)
    top = PCMTokens(PCMConfig(variant="top"), C, 6, 5, 20, 16)
    torch.manual_seed(0)
    r1 = m.mix_plan(feats, train=True).replace
    r2 = m.mix_plan(feats, train=True).replace
    assert (r1.sum(1) == 5).all() and (r2.sum(1) == 5).all()  # round(0.25 * 20) per image
    assert not torch.equal(r1, r2)  # random: a new draw each step
    assert not torch.equal(r1, r2[torch.arange(7, -1, -1)])  # ... and per image
    # a replaced patch gets its own A_i, as in the "top" variant
    plan = m.mix_plan(feats, train=True)
    assert torch.equal(plan.mixture, top.mix_plan(feats, train=True).mixture)
    # inference: the salient (top-M) selection, deterministic, same as "top"
    assert torch.equal(m.mix_plan(feats, train=False).replace, top.mix_plan(feats, train=False).replace)
    assert torch.equal(m.mix_plan(feats, train=False).replace, m.mix_plan(feats, train=False).replace)
    # training tokens: replaced positions carry type 1 -> they differ from the V-only layout
    x, pad = m(feats, train=True)
    assert x.shape == (8, 21, 16) and not pad.any()


def test_pcm_off_is_exactly_visual_tokens():
    feats, C = random_batch()
    vt = VisualTokens(6, 5, 10, 16, noise_variance=0.016, dropout=0.1)
    off = PCMTokens(PCMConfig(enabled=False), None, 6, 5, 10, 16, noise_variance=0.016, dropout=0.1)
    assert off.state_dict().keys() == vt.state_dict().keys()
    off.load_state_dict(vt.state_dict())
    for train in (False, True):
        vt.train(train), off.train(train)
        torch.manual_seed(3)
        a, pa = vt(feats, train)
        torch.manual_seed(3)
        b, pb = off(feats, train)
        assert torch.equal(a, b) and torch.equal(pa, pb)
    assert b.shape == (6, 11, 16)


def test_training_noise_only_on_the_global_token():
    feats, C = random_batch()
    m = PCMTokens(PCMConfig(), C, 6, 5, 10, 16, noise_variance=0.016, dropout=0.0)
    a, _ = m(feats, train=True)
    b, _ = m(feats, train=True)
    assert not torch.allclose(a[:, 0], b[:, 0]) and torch.allclose(a[:, 1:], b[:, 1:])
    # concept detection uses the clean g: the plan is the same whatever the noise
    c, _ = m(feats, train=False)
    d, _ = m(feats, train=False)
    assert torch.equal(c, d)


def test_gradients_reach_only_trainable_parts(toy_backbone):
    """Features from a frozen backbone; the loss reaches Wv, Wt, Wg, positions, types, LN and
    nothing else (the concept bank is a buffer, the backbone gets no gradient)."""
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 16, 16)
    f = toy_backbone.encode_image(pixels)
    feats = {"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds}
    assert not any(t.requires_grad for t in feats.values())
    C = toy_backbone.embed_texts(["dog", "cat", "car", "tree", "man", "boat"])
    m = PCMTokens(PCMConfig(top_k=3, replace_m=4), C, 24, 32, 16, 16, dropout=0.0)
    assert "concepts" in m.state_dict() and "concepts" not in dict(m.named_parameters())
    for train in (True, False):
        m.zero_grad()
        x, pad = m(feats, train)
        (x * torch.randn_like(x)).masked_fill(pad.unsqueeze(-1), 0).sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert m.token_type.weight.grad[1].abs().sum() > 0  # concept tokens were used
        assert m.token_type.weight.grad[2].abs().sum() == 0  # no local tokens here
        assert m.concepts.grad is None
        assert all(p.grad is None for p in toy_backbone.parameters())


def test_masked_concept_tokens_do_not_reach_the_encoder():
    feats, C = random_batch()
    m = PCMTokens(PCMConfig(), C, 6, 5, 10, 16, dropout=0.0)
    enc = VisualSemanticEncoder(width=16, layers=2, heads=2, ffn=32, dropout=0.0).eval()
    x, pad = m(feats, train=False)
    assert x.shape == (6, 21, 16) and pad[:, :11].logical_not().all() and pad[:, 11:].any()
    y = enc(x, pad)
    x2 = torch.where(pad.unsqueeze(-1), torch.randn_like(x) * 10, x)  # change only masked tokens
    y2 = enc(x2, pad)
    assert torch.allclose(y[~pad], y2[~pad], atol=1e-5)


def test_checkpoint_carries_the_concept_bank():
    feats, C = random_batch()
    m = PCMTokens(PCMConfig(), C, 6, 5, 10, 16).eval()
    state = m.state_dict()
    assert torch.allclose(state["concepts"], F.normalize(C, dim=-1))
    fresh = PCMTokens(PCMConfig(), torch.zeros_like(C), 6, 5, 10, 16).eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(feats, False)[0], m(feats, False)[0])


def test_config_and_bank_errors():
    with pytest.raises(ConfigError, match="variant"):
        PCMConfig(variant="best")
    with pytest.raises(ConfigError, match="replace_m"):
        PCMConfig(replace_m=2.5)
    with pytest.raises(ConfigError, match="random_fraction"):
        from_dict(PCMConfig, {"variant": "random", "random_fraction": 1.5})
    with pytest.raises(ConfigError, match="unknown config key 'pcm.topk'"):
        from_dict(PCMConfig, {"topk": 3}, prefix="pcm")
    assert from_dict(PCMConfig, {"replace_m": 0.1, "top_k": 3}).num_entries(49, 3) == 15
    with pytest.raises(CheckpointError, match="D=4 but the backbone embeds in D=6"):
        PCMTokens(PCMConfig(), torch.randn(5, 4), 6, 5, 10, 16)
    with pytest.raises(CheckpointError, match="concept bank"):
        PCMTokens(PCMConfig(), None, 6, 5, 10, 16)
