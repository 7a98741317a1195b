"Long-tail classifier fixes on a frozen detector (simcal.longtail): formulas, group tables, heads and losses."
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from simcal.core import InputError
from simcal.data import CategoryStats, LabelMap
from simcal.longtail import (BAGS_BOUNDARIES, BAGSGroups, BAGSHead, CRTHead, HeldOutSplit, LWSHead, NORCAL_GAMMAS,
                             bags_loss, bags_scores, counts_per_label, heldout_split, logit_adjusted_logits,
                             logit_adjusted_scores, norcal_logits, norcal_scores, search_hyperparameter,
                             tau_normalize_classifier, tau_normalized_weight)


@pytest.fixture(scope='module')
def lvis05():
    return CategoryStats.from_table('lvis_v0.5')


@pytest.fixture()
def case():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 6, generator=g, dtype=torch.float64) * 4
    counts = torch.tensor([0., 2., 15., 150., 1500., 40000.], dtype=torch.float64)
    return logits, counts


# ---- inference-only methods
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_zero_strength_is_the_original_model(dtype, lvis05):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 1231, generator=g) * 5).to(dtype)
    n_img, n_inst = counts_per_label(lvis05, 'image'), counts_per_label(lvis05, 'instance')
    p = torch.softmax(logits, 1)
    assert torch.equal(norcal_logits(logits, n_img, 0.0), logits)
    assert torch.equal(norcal_scores(logits, n_img, 0.0), p)
    assert torch.equal(logit_adjusted_logits(logits, n_inst, tau=0.0), logits)
    assert torch.equal(logit_adjusted_scores(logits, n_inst, tau=0.0), p)
    assert torch.equal(logit_adjusted_scores(logits, n_inst, tau=0.0, background_prior=0.7), p)
    # and a non-zero strength does change the scores
    assert not torch.allclose(norcal_scores(logits, n_img, 0.5), p)


def test_norcal_equals_its_formula(case):
    logits, n = case
    for gamma in (0.3, 1.0, 1.7):
        w = torch.cat([torch.ones(1, dtype=torch.float64), n[1:] ** -gamma])
        num = logits.exp() * w
        expected = num / num.sum(1, keepdim=True)
        torch.testing.assert_close(norcal_scores(logits, n, gamma), expected, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(norcal_scores(logits, n, gamma, renormalize=False),
                                   torch.softmax(logits, 1) * w, rtol=1e-12, atol=1e-15)
    # background logit untouched; foreground shifted by gamma log N_c
    z = norcal_logits(logits, n, 0.5)
    assert torch.equal(z[:, 0], logits[:, 0])
    torch.testing.assert_close(z[:, 1:], logits[:, 1:] - 0.5 * n[1:].log())
    # the ranking inside one proposal moves towards rare classes
    assert norcal_scores(logits, n, 1.0)[:, 1].sum() > torch.softmax(logits, 1)[:, 1].sum()


def test_norcal_is_stable_on_large_logits_and_clamps_zero_counts():
    logits = torch.tensor([[800.0, 900.0, 1000.0]])
    p = norcal_scores(logits, [0, 0, 10], 1.0)     # class 1 has no training images: counted as 1
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match='columns'): norcal_scores(logits, [0, 1], 1.0)
    with pytest.raises(ValueError, match=r'\(N, C\+1\)'): norcal_scores(logits[0], [0, 1, 1], 1.0)


def test_logit_adjustment_equals_its_formula(case):
    logits, n = case
    pi = n[1:] / n[1:].sum()
    for tau in (0.5, 1.0):
        expected = logits.clone(); expected[:, 1:] -= tau * pi.log()
        torch.testing.assert_close(logit_adjusted_logits(logits, n, tau), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logit_adjusted_scores(logits, n, tau), torch.softmax(expected, 1))
        q = 0.95
        prior = torch.cat([torch.tensor([q], dtype=torch.float64), (1 - q) * pi])
        torch.testing.assert_close(logit_adjusted_logits(logits, n, tau, background_prior=q),
                                   logits - tau * prior.log(), rtol=1e-12, atol=1e-12)
    # with the background untouched, logit adjustment = NorCal with instance counts plus a common foreground shift
    la = logit_adjusted_logits(logits, n, 1.0)
    nc = norcal_logits(logits, n, 1.0)
    torch.testing.assert_close(la[:, 1:] - nc[:, 1:], torch.full_like(la[:, 1:], math.log(n[1:].sum())))


def test_tau_norm_equals_its_formula():
    torch.manual_seed(1)
    lin = nn.Linear(16, 5)
    with torch.no_grad(): lin.weight.mul_(torch.tensor([3., 0.5, 1., 2., 8.]).view(5, 1))
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    same = tau_normalize_classifier(lin, tau=0.0)
    assert torch.equal(same.weight, w) and torch.equal(same.bias, b)
    x = torch.randn(4, 16)
    assert torch.equal(same(x), lin(x))
    for tau in (0.5, 1.0, 1.5):
        t = tau_normalize_classifier(lin, tau=tau)
        expected = w.clone(); expected[1:] = w[1:] / w[1:].norm(dim=1, keepdim=True) ** tau
        torch.testing.assert_close(t.weight, expected)
        assert torch.equal(t.weight[0], w[0]) and torch.equal(t.bias, b)     # the stated background rule
    full = tau_normalize_classifier(lin, 1.0, background='normalize', bias='zero')
    torch.testing.assert_close(full.weight.norm(dim=1), torch.ones(5))
    assert torch.count_nonzero(full.bias) == 0
    assert torch.equal(lin.weight, w)                                          # input untouched
    z = torch.zeros(3, 4); z[1] = 2.0
    out = tau_normalized_weight(z, 1.0)
    assert torch.equal(out[2], torch.zeros(4)) and torch.allclose(out[1].norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match='background'): tau_normalized_weight(z, 1.0, background='drop')


def test_counts_per_label(lvis05):
    n = counts_per_label(lvis05, 'image')
    assert n.shape == (1231,) and n[0] == 0 and n[1:].tolist() == [float(c) for c in lvis05.image_count]
    # a label map with other categories than the statistics: a clear error naming the table and the category
    with pytest.raises(InputError, match='category 99999'):
        counts_per_label(lvis05, 'image', LabelMap([1, 2, 99999]))
    sub = counts_per_label(lvis05, 'instance', LabelMap([5, 3]))
    assert sub.tolist() == [0.0, lvis05.instance_counts[3], lvis05.instance_counts[5]]


# ---- search on held-out training images
def test_heldout_split_and_search():
    train = list(range(1000, 1500))
    s = heldout_split(train, fraction=0.1, seed=4)
    assert len(s.heldout_ids) == 50 and len(s.train_ids) == 450
    assert sorted(s.train_ids + s.heldout_ids) == train
    assert s == heldout_split(reversed(train), fraction=0.1, seed=4)      # order of the input does not matter
    assert s.heldout_ids != heldout_split(train, fraction=0.1, seed=5).heldout_ids
    with pytest.raises(ValueError, match='evaluation images'): heldout_split(train, val_image_ids=[1, 1200])
    assert heldout_split(train, val_image_ids=[1, 2]).heldout_ids     # disjoint evaluation ids are fine

    calls = []
    def score(v, ids):
        calls.append((v, ids))
        return {0.0: 0.10, 0.2: 0.12, 0.4: 0.15, 0.6: 0.15, 0.8: 0.11, 1.0: 0.05, 1.2: 0.01}[v]
    r = search_hyperparameter(score, NORCAL_GAMMAS, s)
    assert r.best == 0.4 and r.best_score == 0.15          # tie with 0.6: the first in the grid
    assert [v for v, _ in calls] == list(NORCAL_GAMMAS) and all(ids == s.heldout_ids for _, ids in calls)
    with pytest.raises(TypeError, match='HeldOutSplit'): search_hyperparameter(score, [0.0], s.heldout_ids)
    with pytest.raises(ValueError, match='NaN'): search_hyperparameter(lambda v, i: float('nan'), [0.0], s)


# ---- BAGS
def test_bags_groups_on_lvis_v05_have_the_published_sizes(lvis05):
    g = BAGSGroups.from_stats(lvis05)
    assert BAGS_BOUNDARIES == (10, 100, 1000)
    assert g.sizes == [294, 453, 302, 181]
    assert g.num_outputs == 1236 and g.num_groups == 5
    assert g.slices == [(0, 2), (2, 295), (297, 454), (751, 303), (1054, 182)]
    counts = lvis05.instance_counts
    lo_hi = [(0, 10), (10, 100), (100, 1000), (1000, math.inf)]
    for members, (lo, hi) in zip(g.members[1:], lo_hi):
        assert all(lo <= counts[c] < hi for c in members)      # LVIS v0.5: label = category id
        assert list(members) == sorted(members)
    gl = g.group_labels()
    assert gl.shape == (5, 1231)
    assert (gl[0, 1:] == 1).all() and gl[0, 0] == 0
    for k, members in enumerate(g.members[1:], start=1):
        assert gl[k, list(members)].tolist() == list(range(1, len(members) + 1))
        assert int((gl[k] > 0).sum()) == len(members)


def test_bags_groups_small_and_empty():
    g = BAGSGroups.from_counts([0, 3, 30, 3000], boundaries=(10, 100, 1000))   # no class in [100, 1000)
    assert g.members == ((0,), (1,), (2,), (3,)) and g.num_outputs == 4 + 4
    g2 = BAGSGroups.from_counts([0, 3, 30, 3000], boundaries=(10, 100, 1000), drop_empty=False)
    assert g2.sizes == [1, 1, 0, 1] and g2.num_outputs == 4 + 5
    z = torch.randn(2, g2.num_outputs)
    assert bags_scores(z, g2).shape == (2, 4)
    with pytest.raises(ValueError, match='increasing'): BAGSGroups.from_counts([0, 1], boundaries=(100, 10))


def _direct_bags_scores(z, groups):
    out = torch.zeros(z.shape[0], groups.num_classes, dtype=z.dtype)
    for i in range(z.shape[0]):
        (s0, n0) = groups.slices[0]
        e0 = [math.exp(v) for v in z[i, s0:s0 + n0].tolist()]
        out[i, 0] = e0[0] / sum(e0)
        for (s, n), members in zip(groups.slices[1:], groups.members[1:]):
            e = [math.exp(v) for v in z[i, s:s + n].tolist()]
            for j, c in enumerate(members, start=1):
                out[i, c] = e0[1] / sum(e0) * e[j] / sum(e)
    return out


def test_bags_merge_equals_direct_computation():
    g = BAGSGroups.from_counts([0, 500, 4, 60, 7, 2000, 90], boundaries=(10, 100, 1000))
    assert g.members == ((0,), (2, 4), (3, 6), (1,), (5,))
    z = torch.randn(5, g.num_outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(bags_scores(z, g), _direct_bags_scores(z, g), rtol=1e-12, atol=1e-14)


def test_bags_loss_formula_and_others_subsampling():
    g = BAGSGroups.from_counts([0, 5, 5, 50], boundaries=(10,))      # groups {1, 2} and {3}
    z = torch.randn(6, g.num_outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 0, 0, 3, 3, 2])
    ce = lambda a, b, t: F.cross_entropy(z[:, a:b], torch.tensor(t), reduction='none')
    expected = ce(0, 2, [1, 0, 0, 1, 1, 1]).mean() + ce(2, 5, [1, 0, 0, 0, 0, 2]).mean() + ce(5, 7, [0, 0, 0, 1, 1, 0]).mean()
    torch.testing.assert_close(bags_loss(z, y, g, others_ratio=8.0), expected, rtol=1e-12, atol=1e-12)
    # no own sample in a group: it contributes nothing
    y0 = torch.tensor([0, 0, 3, 3, 3, 3])
    expected0 = ce(0, 2, [0, 0, 1, 1, 1, 1]).mean() + ce(5, 7, [0, 0, 1, 1, 1, 1]).mean()
    torch.testing.assert_close(bags_loss(z, y0, g), expected0, rtol=1e-12, atol=1e-12)
    # subsampling: ratio 1 keeps 1 "other" per own sample. Make every "other" cost a and every own sample cost b
    # in group {3}: its loss is (n_own * b + kept * a) / (n_own + kept) whichever others are drawn
    zz = torch.zeros(8, g.num_outputs, dtype=torch.float64)
    yy = torch.tensor([3, 3, 0, 0, 0, 1, 2, 0])
    zz[yy != 3, 5] = 2.0                        # others: logit 2 on "others" -> cost a
    a = F.cross_entropy(torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor([0])).item()
    b = math.log(2)
    g0 = F.cross_entropy(zz[:, 0:2], (yy > 0).long()).item()
    g1 = math.log(3)          # group {1, 2}: 2 own samples, ratio 1 keeps 2 of the 6 others; every sample costs log 3
    for seed in range(3):
        total = bags_loss(zz, yy, g, others_ratio=1.0, generator=torch.Generator().manual_seed(seed))
        assert total.item() == pytest.approx(g0 + g1 + (2 * b + 2 * a) / 4, rel=1e-12)
    # with a large ratio nothing is dropped
    assert bags_loss(zz, yy, g, others_ratio=100.0).item() == pytest.approx(g0 + g1 + (2 * b + 6 * a) / 8, rel=1e-12)
    with pytest.raises(ValueError, match='BAGS logits'): bags_loss(zz[:, :5], yy, g)


# ---- heads on RoI features
def _toy(n, seed, shape=(8, 7, 7), classes=5):
    centers = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, *shape, generator=g), y


def _train(head, steps=60, lr=0.5):
    x, y = _toy(128, 0)
    opt = torch.optim.SGD(head.trainable_parameters(), lr=lr)
    losses = []
    for it in range(steps):
        loss = head.loss(head(x), y, generator=torch.Generator().manual_seed(it))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture()
def box_head():
    torch.manual_seed(0)
    return nn.Linear(8 * 7 * 7, 64), nn.Linear(64, 64), nn.Linear(64, 5)


def test_crt_head(box_head):
    fc6, fc7, cls = box_head
    head = CRTHead.from_box_head(fc6, fc7, num_classes=5, feature_shape=(8, 7, 7))
    assert torch.equal(head.fc6.weight, fc6.weight) and head.fc6.weight.data_ptr() != fc6.weight.data_ptr()
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ['cls_score.weight', 'cls_score.bias']
    assert head.cls_score.bias.abs().sum() == 0 and head.cls_score.weight.std() < 0.02     # fresh N(0, 0.01)
    x, y = _toy(4, 9)
    assert head(x).shape == (4, 5)
    with pytest.raises(ValueError, match='RoI features'): head(torch.randn(4, 8, 5, 5))
    before = fc6.weight.clone()
    losses = _train(head)
    assert losses[0] == pytest.approx(math.log(5), abs=0.05) and losses[-1] < 0.3 * losses[0]
    assert torch.equal(head.fc6.weight, before)
    xt, yt = _toy(100, 7)
    assert (head.probabilities(head(xt)).argmax(1) == yt).float().mean() > 0.9
    with pytest.raises(ValueError, match='fc6'): CRTHead.from_box_head(nn.Linear(10, 64), fc7, 5, feature_shape=(8, 7, 7))


def test_lws_head(box_head):
    fc6, fc7, cls = box_head
    head = LWSHead.from_box_head(fc6, fc7, cls, feature_shape=(8, 7, 7))
    x, _ = _toy(6, 2)
    feats = F.relu(fc7(F.relu(fc6(x.flatten(1)))))
    torch.testing.assert_close(head(x), cls(feats))                 # at init: the original classifier
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ['scales']
    s = torch.tensor([1., 2., 3., 4., 5.])
    with torch.no_grad(): head.scales.copy_(s)
    # EQLv2's LWSLinear: the weight rows are scaled, the bias is not
    torch.testing.assert_close(head(x), feats @ (cls.weight * s[:, None]).T + cls.bias)
    whole = LWSHead.from_box_head(fc6, fc7, cls, feature_shape=(8, 7, 7), scale_bias=True)
    with torch.no_grad(): whole.scales.copy_(s)
    torch.testing.assert_close(whole(x), cls(feats) * s)
    nobg = LWSHead.from_box_head(fc6, fc7, cls, feature_shape=(8, 7, 7), scale_background=False)
    with torch.no_grad(): nobg.scales.fill_(3.0)
    torch.testing.assert_close(nobg(x)[:, 0], cls(feats)[:, 0])
    # on an under-confident classifier (a trained cRT classifier x0.2) the scales grow and the loss falls
    crt = CRTHead.from_box_head(fc6, fc7, num_classes=5, feature_shape=(8, 7, 7))
    _train(crt)
    weak = nn.Linear(64, 5)
    with torch.no_grad(): weak.weight.copy_(0.2 * crt.cls_score.weight); weak.bias.copy_(0.2 * crt.cls_score.bias)
    head = LWSHead.from_box_head(fc6, fc7, weak, feature_shape=(8, 7, 7))
    losses = _train(head, steps=60, lr=0.5)
    assert losses[-1] < 0.6 * losses[0]          # measured: 1.20 -> 0.63
    assert (head.scales > 1).all()
    assert torch.equal(head.cls_score.weight, weak.weight)


def test_bags_head(box_head):
    fc6, fc7, _ = box_head
    groups = BAGSGroups.from_counts([0, 3, 30, 300, 3000], boundaries=(10, 100, 1000))
    head = BAGSHead.from_box_head(groups, fc6, fc7, feature_shape=(8, 7, 7))
    x, y = _toy(3, 4)
    z = head(x)
    assert z.shape == (3, 5 + 5)
    assert head.probabilities(z).shape == (3, 5)
    torch.testing.assert_close(head.probabilities(z), bags_scores(z, groups))
    losses = _train(head, steps=60)
    assert losses[-1] < 0.3 * losses[0]
    xt, yt = _toy(100, 7)
    assert (head.probabilities(head(xt)).argmax(1) == yt).float().mean() > 0.9
    # published defaults
    assert head.others_ratio == 8.0 and head.freeze_trunk


# ---- the corrections as a detector's predictor
def test_corrected_predictor_on_simcal_predictors():
    from simcal.model import AgnosticBoxPredictor
    from simcal.longtail import CorrectedPredictor
    torch.manual_seed(2)
    pred = AgnosticBoxPredictor(32, 6).eval()
    x = torch.randn(9, 32)
    z, d = pred(x)
    n = torch.tensor([0., 1., 5., 50., 500., 5000.])
    for method in ('norcal', 'logit_adjustment'):
        wrapped = CorrectedPredictor(pred, method, 0.0, n)
        z0, d0 = wrapped(x)
        assert torch.equal(z0, z) and torch.equal(d0, d)
    zn, dn = CorrectedPredictor(pred, 'norcal', 1.2, n)(x)
    torch.testing.assert_close(torch.softmax(zn, 1), norcal_scores(z, n, 1.2))
    assert torch.equal(dn, d)
    zl, _ = CorrectedPredictor(pred, 'logit_adjustment', 1.0, n, background_prior=0.9)(x)
    torch.testing.assert_close(torch.softmax(zl, 1), logit_adjusted_scores(z, n, 1.0, background_prior=0.9))
    zt, _ = CorrectedPredictor(pred, 'tau_norm', 0.7, background='normalize')(x)
    torch.testing.assert_close(zt, tau_normalize_classifier(pred.cls_score, 0.7, background='normalize')(x))
    assert torch.equal(CorrectedPredictor(pred, 'tau_norm', 0.0)(x)[0], z)
    with pytest.raises(ValueError, match='6 outputs'): CorrectedPredictor(pred, 'norcal', 1.0, n[:5])
    with pytest.raises(ValueError, match='unknown correction'): CorrectedPredictor(pred, 'seesaw', 1.0, n)


# ---- scorers (the detector adapters' install_scorer contract: per-stage logits and RoI features -> probabilities)
def test_scorers(box_head):
    from simcal.longtail import CorrectionScorer, HeadScorer, tau_norm_head
    fc6, fc7, cls = box_head
    x, _ = _toy(6, 11)
    z = cls(F.relu(fc7(F.relu(fc6(x.flatten(1))))))
    n = torch.tensor([0., 4., 40., 400., 4000.])
    assert torch.equal(CorrectionScorer('norcal', 0.0, n)([z], [x]), torch.softmax(z, 1))
    torch.testing.assert_close(CorrectionScorer('norcal', 0.5, n, renormalize=False)([z], [x]),
                               norcal_scores(z, n, 0.5, renormalize=False))
    z2 = z + 1.0 * torch.arange(5.)
    torch.testing.assert_close(CorrectionScorer('logit_adjustment', 0.7, n)([z, z2], [x, x]),
                               logit_adjusted_scores((z + z2) / 2, n, 0.7))
    with pytest.raises(ValueError, match='no option'): CorrectionScorer('norcal', 1.0, n, background_prior=0.5)
    # heads: the same probabilities as the head itself, stages averaged in logit space
    groups = BAGSGroups.from_counts([0, 3, 30, 300, 3000], boundaries=(10, 100, 1000))
    b1 = BAGSHead.from_box_head(groups, fc6, fc7, feature_shape=(8, 7, 7))
    b2 = BAGSHead.from_box_head(groups, fc6, fc7, feature_shape=(8, 7, 7))
    torch.testing.assert_close(HeadScorer(b1)([z], [x]), bags_scores(b1(x), groups))
    torch.testing.assert_close(HeadScorer([b1, b2])([z, z], [x, x]), bags_scores((b1(x) + b2(x)) / 2, groups))
    with pytest.raises(ValueError, match='stages'): HeadScorer([b1, b2])([z], [x])
    tn = tau_norm_head(fc6, fc7, cls, tau=0.0, feature_shape=(8, 7, 7))
    torch.testing.assert_close(HeadScorer(tn)([z], [x]), torch.softmax(z, 1))     # tau = 0: the original scores
    assert tn.num_classes == 5 and tn.trainable_parameters() == []


def test_heldout_split_covers_rare_classes():
    rng = np.random.default_rng(0)
    ids = list(range(5000, 7000))
    c2i = {l: rng.choice(ids, size=max(1, int(800 / l ** 1.2)), replace=False).tolist() for l in range(1, 301)}
    plain = heldout_split(ids, fraction=0.1, seed=1)
    missing = [l for l, v in c2i.items() if len(v) >= 2 and not set(v) & set(plain.heldout_ids)]
    assert len(missing) > 20                     # a plain random split misses many rare classes
    s = heldout_split(ids, fraction=0.1, seed=1, class_to_image_ids=c2i)
    assert set(plain.heldout_ids) <= set(s.heldout_ids)
    for l, v in c2i.items():
        if len(v) >= 2: assert set(v) & set(s.heldout_ids), l
    assert len(s.heldout_ids) <= len(plain.heldout_ids) + len(missing)
    assert sorted(s.train_ids + s.heldout_ids) == ids
    assert s == heldout_split(ids, fraction=0.1, seed=1, class_to_image_ids=c2i)
    with pytest.raises(ValueError, match='not training images'):
        heldout_split(ids, class_to_image_ids={1: [1, 2]})
