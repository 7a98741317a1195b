"Statistical and bookkeeping checks of the bi-level sampler (simcal.sampler)."
import math
import numpy as np
import pytest

from simcal.sampler import BiLevelSampler, derived_seed


def chi2_critical(dof, z=3.0902):
    "The 0.999 quantile of a chi-square distribution (Wilson-Hilferty approximation)."
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.fixture(scope='module')
def long_tail():
    "class_to_indices of a long-tailed set: 120 classes over 3000 images, the head class in ~1000 images, the tail in 1."
    rng = np.random.default_rng(11)
    out = {}
    for label in range(1, 121):
        n = max(1, int(1000 / label ** 1.3))
        out[label] = sorted(rng.choice(3000, size=n, replace=False).tolist())
    out[121] = []   # a class without training images
    return out


def test_class_draws_are_uniform_over_classes(long_tail):
    s = BiLevelSampler(long_tail, classes_per_iter=16, seed=0)
    assert s.labels == list(range(1, 121))
    iters = 4000
    counts = np.zeros(122)
    for it in range(iters):
        for label, _ in s.draws(it): counts[label] += 1
    assert counts[0] == 0 and counts[121] == 0
    obs, exp = counts[1:121], iters * 16 / 120
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < chi2_critical(119), (chi2, chi2_critical(119))
    assert np.abs(obs / exp - 1).max() < 0.2   # every class within 20 % of its expected 533 draws
    # the head class would be drawn ~20x more often if images, not classes, were drawn uniformly
    sizes = np.array([len(long_tail[l]) for l in range(1, 121)], float)
    assert sizes[0] / sizes.mean() > 10


def test_image_draws_uniform_within_class_and_contain_it(long_tail):
    s = BiLevelSampler(long_tail, classes_per_iter=16, images_per_class=4, seed=5)
    per_image = {}
    for it in range(3000):
        for label, idx in s.draws(it):
            assert idx in long_tail[label]
            if label == 20: per_image[idx] = per_image.get(idx, 0) + 1
    imgs = long_tail[20]
    obs = np.array([per_image.get(i, 0) for i in imgs], float)
    exp = obs.sum() / len(imgs)
    assert exp > 20
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < chi2_critical(len(imgs) - 1)


def test_batch_layout_class_major(long_tail):
    s = BiLevelSampler(long_tail, classes_per_iter=5, images_per_class=3, seed=2)
    b = s.draws(7)
    assert len(b) == 15 and s.batch_size == 15
    for c in range(5):
        assert len({label for label, _ in b[3 * c:3 * c + 3]}) == 1


@pytest.mark.parametrize('world', [1, 2, 3, 4, 16, 24])
def test_ranks_partition_the_global_batch(long_tail, world):
    s = BiLevelSampler(long_tail, seed=9)
    for it in (0, 1, 123):
        parts = [s.rank_draws(it, r, world) for r in range(world)]
        assert sum(parts, []) == s.draws(it)               # union, in rank order, is the global batch
        assert sum(len(p) for p in parts) == 16           # every drawn class gets its image
        batches = [next(s.iterate(it, it + 1, r, world)) for r in range(world)]
        assert [list(b.positions) for b in batches] == [list(s.rank_slice(r, world)) for r in range(world)]
        assert [b.draws for b in batches] == parts


def test_world_size_one_and_two_agree(long_tail):
    one = BiLevelSampler(long_tail, seed=4)
    two = [BiLevelSampler(long_tail, seed=4) for _ in range(2)]  # one sampler per process
    for b0, b1, b2 in zip(one.iterate(0, 50), two[0].iterate(0, 50, 0, 2), two[1].iterate(0, 50, 1, 2)):
        assert b0.iteration == b1.iteration == b2.iteration
        assert b1.draws + b2.draws == b0.draws


def test_resume_reproduces_draws(long_tail):
    s = BiLevelSampler(long_tail, seed=13)
    through = [b.draws for b in s.iterate(0, 40, rank=1, world_size=2)]
    resumed = [b.draws for b in BiLevelSampler(long_tail, seed=13).iterate(25, 40, rank=1, world_size=2)]
    assert resumed == through[25:]
    # different seeds or iterations give different batches
    assert s.draws(3) != s.draws(4) and s.draws(3) != BiLevelSampler(long_tail, seed=14).draws(3)


def test_tau_interpolates_towards_instance_counts(long_tail):
    counts = {l: 3 * len(v) for l, v in long_tail.items() if v}
    s = BiLevelSampler(long_tail, seed=1, tau=1.0, instance_counts=counts)
    expected = np.minimum([counts[l] for l in s.labels], 100).astype(float)
    np.testing.assert_allclose(s.class_probs, expected / expected.sum())
    draws = np.zeros(121)
    for it in range(2000):
        for label, _ in s.draws(it): draws[label] += 1
    freq = draws[1:] / draws.sum()
    assert abs(freq[0] - s.class_probs[0]) < 0.01 and freq[0] > 3 * freq[-1]
    with pytest.raises(ValueError, match='instance_counts'): BiLevelSampler(long_tail, tau=0.5)


def test_bad_arguments(long_tail):
    with pytest.raises(ValueError, match='no class'): BiLevelSampler({1: [], 2: []})
    with pytest.raises(ValueError, match='>= 1'): BiLevelSampler(long_tail, classes_per_iter=0)
    s = BiLevelSampler(long_tail)
    with pytest.raises(ValueError, match='rank'): s.rank_draws(0, 2, 2)
    with pytest.raises(ValueError, match='iteration'): s.draws(-1)
    assert derived_seed(1, 2, 3) != derived_seed(1, 3, 2)


# ---- epoch-stream samplers: repeat-factor sampling (RFS) and class-aware sampling
import json
from simcal.core import table_path
from simcal.data import CategoryStats
from simcal.sampler import (ClassAwareSampler, RepeatFactorSampler, RFS_THRESHOLD, TRAIN_IMAGES,
                            category_repeat_factors, image_repeat_factors, rank_slice)


@pytest.mark.parametrize('table', ['lvis_v0.5', 'lvis_v1'])
def test_rfs_category_factors_on_shipped_tables(table):
    "r_c = max(1, sqrt(t / f_c)) with f_c = image_count / N, checked against the raw table file."
    st = CategoryStats.from_table(table)
    n = TRAIN_IMAGES[table]
    rc = category_repeat_factors(st.image_counts, n)
    raw = json.loads(table_path(table).read_text())
    assert RFS_THRESHOLD == 0.001 and len(rc) == len(raw) == len(st)
    for rec in raw:
        f = rec['image_count'] / n
        assert rc[rec['id']] == pytest.approx(max(1.0, math.sqrt(0.001 / f)), rel=1e-12), rec['name']
    repeated = [r['id'] for r in raw if r['image_count'] < 0.001 * n]
    assert sorted(c for c, r in rc.items() if r > 1) == sorted(repeated)
    assert len(repeated) == {'lvis_v0.5': 831, 'lvis_v1': 798}[table]
    assert max(rc.values()) == pytest.approx(math.sqrt(0.001 * n / min(r['image_count'] for r in raw)))
    # a different threshold changes the factors as the formula says
    rc2 = category_repeat_factors(st.image_counts, n, t=0.004)
    c = raw[0]['id']
    assert rc2[c] == pytest.approx(max(1.0, 2 * math.sqrt(0.001 * n / raw[0]['image_count'])))


def test_rfs_image_factor_is_max_over_categories():
    c2i = {1: [0], 2: [0, 1, 2, 3], 3: [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]}   # 20 images, 6 without categories
    r = image_repeat_factors(c2i, 20, t=0.3)
    r1, r2 = math.sqrt(0.3 / (1 / 20)), math.sqrt(0.3 / (4 / 20))
    np.testing.assert_allclose(r[:4], [r1, r2, r2, r2])
    np.testing.assert_allclose(r[4:], 1.0)      # class 3 (f = 0.5 > t) and images without categories
    with pytest.raises(ValueError, match='out of range'): image_repeat_factors({1: [20]}, 20)
    with pytest.raises(ValueError, match='> 0'): category_repeat_factors({1: 1}, 10, t=0)


def _lvis_like_factors():
    "Image repeat factors of a stand-in for LVIS v0.5 train: one image per (category, image) pair of the table."
    st = CategoryStats.from_table('lvis_v0.5')
    rc = category_repeat_factors(st.image_counts, TRAIN_IMAGES['lvis_v0.5'])
    return np.repeat([rc[c] for c in st.ids], st.image_count)


def test_rfs_epoch_length_in_expectation():
    r = _lvis_like_factors()
    s = RepeatFactorSampler(r, seed=1)
    frac = r - np.floor(r)
    assert s.expected_epoch_length == pytest.approx(r.sum())
    assert s.epoch_length_variance == pytest.approx((frac * (1 - frac)).sum())
    epochs = 12
    lengths = np.array([s.epoch_length(e) for e in range(epochs)])
    sd = math.sqrt(s.epoch_length_variance)
    assert sd > 40                                        # the length really varies from epoch to epoch (sd 44.5)
    assert len(set(lengths.tolist())) > 1
    # mean of 12 epochs within 4.5 standard errors of sum r_i; each epoch within 5 sd
    assert abs(lengths.mean() - r.sum()) < 4.5 * sd / math.sqrt(epochs), (lengths, r.sum(), sd)
    assert np.all(np.abs(lengths - r.sum()) < 5 * sd)
    # per image: floor or ceil of r_i, and the mean count of the rare images approaches r_i
    counts = np.stack([s.epoch_counts(e) for e in range(epochs)])
    assert np.all((counts == np.floor(r)) | (counts == np.ceil(r)))
    rare = r > 5
    exp, var = r[rare].sum() * epochs, (frac[rare] * (1 - frac[rare])).sum() * epochs
    assert abs(counts[:, rare].sum() - exp) < 4.5 * math.sqrt(var)
    # a rounding that always floors would be far off
    assert r.sum() - np.floor(r).sum() > 20 * sd


def test_rfs_epoch_list_and_resume():
    rng = np.random.default_rng(2)
    r = 1 + rng.exponential(0.7, size=300) * (rng.random(300) < 0.3)
    s = RepeatFactorSampler(r, seed=7)
    for e in range(3):
        idx = s.epoch_indices(e)
        np.testing.assert_array_equal(np.bincount(idx, minlength=300), s.epoch_counts(e))
        assert not np.array_equal(idx, np.sort(idx))      # shuffled
    np.testing.assert_array_equal(s.epoch_indices(2), RepeatFactorSampler(r, seed=7).epoch_indices(2))
    assert not np.array_equal(s.epoch_indices(0), RepeatFactorSampler(r, seed=8).epoch_indices(0))
    B = 16
    through = list(s.batches(B, num_iters=80))             # > 2 epochs of ~ 380 draws
    stream = np.concatenate([s.epoch_indices(e) for e in range(5)])
    assert sum((b.indices for b in through), []) == stream[:80 * B].tolist()
    assert through[-1].end[0] >= 2
    for k in (0, 23, 24, 50):
        assert s.locate(k, B) == through[k].start
        fresh = RepeatFactorSampler(r, seed=7)               # a new process resuming at (epoch, position)
        assert [b.indices for b in fresh.batches(B, *through[k].start, num_iters=10)] == [b.indices for b in through[k:k + 10]]
        assert through[k].end == through[k + 1].start
    for world in (2, 3, 5):
        ranks = [list(RepeatFactorSampler(r, seed=7).batches(B, 1, 5, rank=q, world_size=world, num_iters=30))
                 for q in range(world)]
        ref = list(s.batches(B, 1, 5, num_iters=30))
        for k in range(30):
            assert sum((ranks[q][k].indices for q in range(world)), []) == ref[k].indices
            assert [ranks[q][k].first_position for q in range(world)] == [rank_slice(B, q, world).start for q in range(world)]


def test_class_aware_sampler_balances_classes(long_tail):
    s = ClassAwareSampler(long_tail, epoch_length=3000, seed=0)
    assert s.labels == list(range(1, 121))
    labels, idx = s.epoch_draws(0)
    assert len(labels) == len(idx) == 3000 == s.epoch_length(0)
    for label, i in zip(labels, idx): assert i in long_tail[label]
    per_class = np.bincount(labels, minlength=122)[1:121]
    assert per_class.min() == 25 and per_class.max() == 25      # 3000 draws = 25 rounds of 120 classes
    # within a class, images are used round-robin: counts differ by at most 1
    for label in (1, 5, 40):
        c = np.bincount(idx[labels == label], minlength=3000)[long_tail[label]]
        assert c.max() - c.min() <= 1
    # images_per_class = 2: visits take two images of the class
    s2 = ClassAwareSampler(long_tail, epoch_length=1000, seed=0, images_per_class=2)
    l2, _ = s2.epoch_draws(1)
    assert np.all(l2[0::2] == l2[1::2])
    # resumable stream, split across ranks like the other samplers
    through = list(s.batches(64, num_iters=60))
    assert [b.indices for b in s.batches(64, *through[47].start, num_iters=13)] == [b.indices for b in through[47:]]
    halves = [list(s.batches(64, rank=q, world_size=2, num_iters=60)) for q in range(2)]
    assert [a.indices + b.indices for a, b in zip(*halves)] == [b.indices for b in through]
    with pytest.raises(ValueError, match='no class'): ClassAwareSampler({1: []}, 10)


def test_rfs_epoch_length_matches_epoch_list():
    r = np.array([1.0, 1.5, 2.25, 7.9, 1.0, 3.0])
    s = RepeatFactorSampler(r, seed=3)
    for e in range(20):
        assert s.epoch_length(e) == len(s.epoch_indices(e)) == int(s.epoch_counts(e).sum())
