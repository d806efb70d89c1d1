"""Oracles for train/heads.py: pytorch-metric-learning's ArcFaceLoss (float64), independent
formulas for each branch, a brute-force sub-center loop, the dynamic-margin formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.heads import ArcMarginHead, MultiHeadLoss, class_counts, dynamic_margins

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning.reducers import MeanReducer  # noqa: E402

D, C = 8, 6


def _pml_arcface(weight: torch.Tensor, m_rad: float, s: float):
    """PML ArcFaceLoss (margin in DEGREES) holding our weight (PML stores W as [D, C])."""
    loss_fn = pml_losses.ArcFaceLoss(C, D, margin=math.degrees(m_rad), scale=s, reducer=MeanReducer())
    loss_fn.W.data = weight.detach().t().clone().to(torch.float64)
    return loss_fn


def _run_pml(loss_fn, emb: torch.Tensor, labels: torch.Tensor):
    """(PML loss, {"logits": the logits it fed to its cross entropy})."""
    seen = {}
    loss_fn.cross_entropy.register_forward_hook(lambda _mod, inputs, _out: seen.update(logits=inputs[0]))
    return loss_fn(emb, labels), seen


def _assert_equal_to_pml(head: ArcMarginHead, loss_fn, emb: torch.Tensor, labels: torch.Tensor) -> None:
    """Our logits, CE loss and gradients (embeddings, weight) equal PML's ``loss_fn`` in float64."""
    pml_loss, seen = _run_pml(loss_fn, emb, labels)
    logits = head(emb, labels)
    ours = F.cross_entropy(logits, labels)
    torch.testing.assert_close(logits, seen["logits"], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours, pml_loss, rtol=0, atol=1e-12)
    g_emb, g_w = torch.autograd.grad(ours, [emb, head.weight])
    p_emb, p_w = torch.autograd.grad(pml_loss, [emb, loss_fn.W])
    torch.testing.assert_close(g_emb, p_emb, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_w, p_w.t(), rtol=0, atol=1e-10)


def _np_cosines(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Oracle: cos[i, j] = <e_i, w_j> / (|e_i| |w_j|), row by row in numpy float64 (no torch math)."""
    e, w = emb.detach().numpy().astype(np.float64), weight.detach().numpy().astype(np.float64)
    out = np.empty((len(e), len(w)))
    for i in range(len(e)):
        for j in range(len(w)):
            norms = math.sqrt(np.dot(e[i], e[i])) * math.sqrt(np.dot(w[j], w[j]))
            out[i, j] = float(np.dot(e[i], w[j])) / norms
    return torch.from_numpy(out)


def _head(m=0.5, s=30.0, k=1, n=C, seed=0, **kw) -> ArcMarginHead:
    torch.manual_seed(seed)
    return ArcMarginHead(D, n, k=k, s=s, m=m, **kw).double()


def _embeddings_hitting_both_branches(head: ArcMarginHead, labels: torch.Tensor) -> torch.Tensor:
    """Rows alternate between near the target centre (theta small) and near its antipode
    (theta > pi - m), so both sides of the fallback are exercised."""
    torch.manual_seed(1)
    w = F.normalize(head.weight.detach(), dim=1)[labels]
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(labels))], dtype=torch.float64)
    return sign[:, None] * w * 3.0 + 0.05 * torch.randn(len(labels), D, dtype=torch.float64)


def test_logits_loss_and_grads_equal_pml_float64_both_branches():
    m, s = 0.5, 30.0
    head = _head(m=m, s=s)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    emb = _embeddings_hitting_both_branches(head, labels).requires_grad_(True)
    cos_t = F.cosine_similarity(emb.detach(), head.weight.detach()[labels], dim=1)
    theta = torch.acos(cos_t)
    assert (theta > math.pi - m).sum() >= 3 and (theta < math.pi - m).sum() >= 3  # both branches hit

    _assert_equal_to_pml(head, _pml_arcface(head.weight, m, s), emb, labels)


def test_each_branch_against_independent_formula():
    """theta <= pi - m: s*cos(theta + m) (via acos); theta > pi - m: s*(cos(theta) - m*sin(m))."""
    m, s = 0.7, 16.0
    head = _head(m=m, s=s)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    emb = _embeddings_hitting_both_branches(head, labels)
    logits = head(emb, labels)
    cos = _np_cosines(emb, head.weight)
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(cos[i, y].item())
        want = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
        assert logits[i, y].item() == pytest.approx(s * want, abs=1e-9)
        others = [j for j in range(C) if j != y]
        torch.testing.assert_close(logits[i, others], s * cos[i, others])
    # the margin (either branch) always lowers the target logit
    target, plain = logits.gather(1, labels[:, None]), s * cos.gather(1, labels[:, None])
    assert (target < plain).all()


def test_easy_margin_formula():
    m, s = 0.5, 10.0
    head = _head(m=m, s=s, easy_margin=True)
    labels = torch.tensor([0, 1, 2, 3])
    emb = _embeddings_hitting_both_branches(head, labels)
    logits = head(emb, labels)
    cos = _np_cosines(emb, head.weight)
    for i, y in enumerate(labels.tolist()):
        c = cos[i, y].item()
        want = math.cos(math.acos(c) + m) if c > 0 else c
        assert logits[i, y].item() == pytest.approx(s * want, abs=1e-9)


def test_inference_logits_are_scaled_cosine_without_margin():
    head = _head(s=20.0)
    emb = torch.randn(5, D, dtype=torch.float64)
    cos = _np_cosines(emb, head.weight)
    torch.testing.assert_close(head(emb), 20.0 * cos)
    torch.testing.assert_close(head.cosine(emb), cos)


def test_per_class_margins_match_pml_run_per_margin():
    """Per-class margins: each row's target logit equals PML's with that row's class margin."""
    counts = np.array([1, 2, 3, 5, 40, 1000])
    margins = dynamic_margins(counts)
    head = _head(m=margins, s=30.0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 0])
    emb = _embeddings_hitting_both_branches(head, labels)
    logits = head(emb, labels)
    for c in range(C):
        rows = (labels == c).nonzero().reshape(-1)
        _, seen = _run_pml(_pml_arcface(head.weight, margins[c].item(), 30.0), emb[rows], labels[rows])
        torch.testing.assert_close(logits[rows], seen["logits"], rtol=0, atol=1e-10)


def test_dynamic_margins_formula_and_errors():
    counts = [1, 2, 10, 1000]
    got = dynamic_margins(counts)
    want = [0.27126 * n**-0.364399 + 0.05 for n in counts]  # 1st-place Happywhale config
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15)
    assert got[0].item() == pytest.approx(0.32126)  # n = 1: a + c
    assert (got.diff() < 0).all()  # rarer classes get larger margins
    np.testing.assert_allclose(dynamic_margins(counts, a=1.0, b=1.0, c=0.0).numpy(), counts)
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        dynamic_margins([3, 0, 2])
    assert class_counts([0, 2, 2, 1, 2], 4).tolist() == [1, 1, 3, 0]


def test_subcenter_with_identical_sub_centres_equals_pml_arcface():
    """k copies of each class centre: max over sub-centres is that centre, so logits, loss and
    the embedding gradient equal PML's plain ArcFaceLoss holding the centres (float64)."""
    m, s, k = 0.4, 25.0, 3
    torch.manual_seed(5)
    centres = torch.randn(C, D, dtype=torch.float64)
    sub = _head(m=m, s=s, k=k)
    sub.weight.data = centres.repeat_interleave(k, dim=0).clone()  # rows c*k .. c*k+k-1 = centre c
    labels = torch.tensor([0, 3, 5, 1, 2, 4])
    emb = torch.randn(len(labels), D, dtype=torch.float64, requires_grad=True)
    pml_loss, seen = _run_pml(_pml_arcface(centres, m, s), emb, labels)
    logits = sub(emb, labels)
    torch.testing.assert_close(logits, seen["logits"], rtol=0, atol=1e-10)
    ours = F.cross_entropy(logits, labels)
    torch.testing.assert_close(ours, pml_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, emb)[0], torch.autograd.grad(pml_loss, emb)[0],
                               rtol=0, atol=1e-10)


def test_subcenter_cosine_and_margin_against_brute_force():
    m, s, k = 0.4, 25.0, 3
    sub = _head(m=m, s=s, k=k, seed=3)
    labels = torch.tensor([0, 3, 5, 1])
    torch.manual_seed(6)
    emb = torch.randn(4, D, dtype=torch.float64)
    all_cos = _np_cosines(emb, sub.weight)  # [B, C * k]
    best = torch.tensor([[max(all_cos[i, c * k + j].item() for j in range(k)) for c in range(C)]
                         for i in range(len(emb))], dtype=torch.float64)
    torch.testing.assert_close(sub.cosine(emb), best, rtol=0, atol=1e-12)
    # training logits: the margin applies to the best sub-centre's angle, other classes keep s * cos
    logits = sub(emb, labels)
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(best[i, y].item())
        want = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
        assert logits[i, y].item() == pytest.approx(s * want, abs=1e-9)
        others = [c for c in range(C) if c != y]
        torch.testing.assert_close(logits[i, others], s * best[i, others], rtol=0, atol=1e-9)


def test_default_margins_are_the_configs():
    """One source for the margin constants: the config defaults give the heads' default margins."""
    from train.config import TrainConfig

    cfg, counts = TrainConfig(), [1, 3, 50]
    from_config = dynamic_margins(counts, cfg.margin_a, cfg.margin_b, cfg.margin_c)
    torch.testing.assert_close(dynamic_margins(counts), from_config, rtol=0, atol=0)
    assert cfg.margin_b == -0.364399  # the 1st-place Happywhale exponent


def test_class_centres_and_sub_centres():
    head = _head(k=2)
    centres, subs = head.class_centres(), head.sub_centres()
    assert centres.shape == (C, D) and subs.shape == (C, 2, D) and centres.dtype == torch.float32
    w = F.normalize(head.weight.detach(), dim=1).float()
    torch.testing.assert_close(subs[2, 1], w[5])  # class 2, sub-centre 1 = row 2*k + 1
    torch.testing.assert_close(centres[4], F.normalize(w[8] + w[9], dim=0))
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(C))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_float32_and_matches_fp32(amp_dtype):
    torch.manual_seed(0)
    head = ArcMarginHead(D, C, k=2, s=30.0, m=dynamic_margins([1, 2, 3, 4, 5, 6]).numpy())
    emb = torch.randn(4, D)
    labels = torch.tensor([0, 1, 2, 3])
    ref = head(emb, labels)
    with torch.autocast("cpu", dtype=amp_dtype):
        x = torch.nn.Linear(D, D).to(emb)(emb)  # a low-precision neck output under autocast
        assert x.dtype == amp_dtype
        out = head(x, labels)
        out_same = head(emb, labels)
        loss, _ = MultiHeadLoss()(out, labels)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(out_same, ref)  # no low-precision rounding inside the head
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


@pytest.mark.gpu
def test_cuda_fp16_autocast_matches_cpu():
    torch.manual_seed(0)
    head = ArcMarginHead(D, C, k=2, s=64.0, m=dynamic_margins([1, 2, 3, 4, 5, 6]))
    emb, labels = torch.randn(16, D), torch.randint(0, C, (16,))
    ref = head(emb, labels)
    gpu = head.to("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = gpu(emb.to("cuda").half(), labels.to("cuda"))
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=64 * 2e-3)  # fp16 input rounding only


def test_single_class_and_extreme_cosines_stay_finite():
    head = ArcMarginHead(D, 1, s=30.0, m=0.5)
    emb = torch.cat([head.weight.detach(), -head.weight.detach(), torch.randn(2, D)]).requires_grad_(True)
    labels = torch.zeros(4, dtype=torch.long)
    logits = head(emb, labels)
    assert logits.shape == (4, 1)
    loss, _ = MultiHeadLoss()(logits, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # one class: CE is zero
    (logits.sum()).backward()  # cos = +-1 exactly: clamping keeps the sqrt gradient finite
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_multihead_loss_weights_species_and_smoothing():
    torch.manual_seed(0)
    id_logits, sp_logits = torch.randn(5, 7), torch.randn(5, 3)
    ids, sps = torch.tensor([0, 1, 2, 3, 6]), torch.tensor([0, 2, -100, 1, 1])
    loss, parts = MultiHeadLoss(species_weight=0.3, label_smoothing=0.1, id_weight=0.7)(
        id_logits, ids, sp_logits, sps
    )

    def smoothed_ce(z, y, eps):  # independent formula: (1-eps)*nll + eps*mean(-log p)
        logp = torch.log_softmax(z, dim=1)
        keep = y != -100
        logp, y = logp[keep], y[keep]
        per = (1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) + eps * -logp.mean(dim=1)
        return per.mean()

    want_id, want_sp = smoothed_ce(id_logits, ids, 0.1), smoothed_ce(sp_logits, sps, 0.1)
    torch.testing.assert_close(parts["loss_id"], want_id)
    torch.testing.assert_close(parts["loss_species"], want_sp)
    torch.testing.assert_close(loss, 0.7 * want_id + 0.3 * want_sp)
    only_id, parts = MultiHeadLoss(species_weight=0.0)(id_logits, ids, sp_logits, sps)
    assert "loss_species" not in parts and only_id.item() == pytest.approx(
        F.cross_entropy(id_logits, ids).item()
    )


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="degrees"):
        ArcMarginHead(D, C, m=28.6)
    with pytest.raises(ValueError, match="margins"):
        ArcMarginHead(D, C, m=[0.1, 0.2])
    with pytest.raises(ValueError):
        ArcMarginHead(D, 0)
    head = ArcMarginHead(D, C)
    with pytest.raises(ValueError, match="degrees"):
        head.set_margins(30.0)
    head.set_margins(dynamic_margins(range(1, C + 1)))
    assert head.margins[0].item() == pytest.approx(0.27126 + 0.05)


def test_state_dict_roundtrip_keeps_margins_and_init_from_embeddings():
    head = ArcMarginHead(D, C, k=2, m=dynamic_margins([1, 1, 2, 3, 5, 8]))
    other = ArcMarginHead(D, C, k=2, m=0.5)
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other.margins, head.margins)
    torch.manual_seed(0)
    emb, labels = torch.randn(10, D), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    before5 = head.weight.detach()[10:12].clone()
    assert head.init_from_embeddings(emb, labels) == 5
    mean0 = F.normalize(F.normalize(emb[:2], dim=1).sum(0), dim=0)
    assert F.cosine_similarity(head.class_centres()[0], mean0, dim=0).item() > 0.999
    torch.testing.assert_close(head.weight.detach()[10:12], before5)  # class 5 unseen: untouched


def test_subcenter_logits_loss_and_grads_equal_pml_subcenter_arcface():
    m, s, k = 0.45, 20.0, 3
    head = _head(m=m, s=s, k=k, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 1, 4])
    torch.manual_seed(2)
    base = torch.randn(C, 1, D, dtype=torch.float64)  # sub-centres of a class close together, so an
    head.weight.data = (base + 0.1 * torch.randn(C, k, D, dtype=torch.float64)).reshape(C * k, D)
    rows = labels * k + torch.randint(0, k, (len(labels),))  # antipode is beyond pi - m from all
    sign = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)[:, None]
    emb = sign * F.normalize(head.weight.detach()[rows], dim=1) * 2 + 0.05 * torch.randn(
        8, D, dtype=torch.float64
    )
    emb.requires_grad_(True)
    theta = torch.acos(head.cosine(emb.detach()).gather(1, labels[:, None]))
    assert (theta > math.pi - m).any() and (theta < math.pi - m).any()

    pml = pml_losses.SubCenterArcFaceLoss(
        num_classes=C, embedding_size=D, margin=math.degrees(m), scale=s, sub_centers=k, reducer=MeanReducer()
    )
    pml.W.data = head.weight.detach().t().clone()
    _assert_equal_to_pml(head, pml, emb, labels)


def test_heads_learn_a_toy_problem_with_species_head():
    """End to end: a linear neck + sub-center id head + species head trained with MultiHeadLoss
    separate Gaussian clusters; inference logits (no margin) then classify held-out points."""
    torch.manual_seed(0)
    n_ids, per_species, dim = 12, 4, 16
    means = torch.randn(n_ids, dim) * 2
    x = means.repeat_interleave(20, 0) + 0.5 * torch.randn(n_ids * 20, dim)
    y = torch.arange(n_ids).repeat_interleave(20)
    sp = y // per_species
    counts = class_counts(y[::2].numpy(), n_ids)
    neck = torch.nn.Linear(dim, 8)
    id_head = ArcMarginHead(8, n_ids, k=2, s=16.0, m=dynamic_margins(counts))
    sp_head = ArcMarginHead(8, n_ids // per_species, s=16.0, m=0.2)
    loss_fn = MultiHeadLoss(species_weight=0.5)
    params = [*neck.parameters(), *id_head.parameters(), *sp_head.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    train, held = torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)
    first = None
    for _ in range(60):
        f = neck(x[train])
        loss, parts = loss_fn(id_head(f, y[train]), y[train], sp_head(f, sp[train]), sp[train])
        first = first if first is not None else {k: v.item() for k, v in parts.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (
        parts["loss_id"].item() < 0.5 * first["loss_id"]
        and parts["loss_species"].item() < first["loss_species"]
    )
    with torch.no_grad():
        f = neck(x[held])
        assert (id_head(f).argmax(1) == y[held]).float().mean().item() > 0.9
        assert (sp_head(f).argmax(1) == sp[held]).float().mean().item() > 0.9
        fn = F.normalize(f, dim=1)
        subs = id_head.sub_centres()  # [C, k, D]: max over them reproduces the head's own argmax
        by_sub = torch.einsum("bd,ckd->bck", fn, subs).amax(2).argmax(1)
        assert torch.equal(by_sub, id_head(f).argmax(1))
        # the mean of two diverging sub-centres is a blunter centre than max-over-sub-centres
        centre_acc = ((fn @ id_head.class_centres().t()).argmax(1) == y[held]).float().mean().item()
        assert centre_acc > 0.7
