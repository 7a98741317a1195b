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
