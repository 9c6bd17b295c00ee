"""The CPU backend's dropout masks (fastlora.cpu_masks): reproducible from the seed, the keep rate, the three
samplers, in place, and per thread."""

import pytest
import torch

from fastlora import cpu_masks


def test_cpu_keep_mask_is_reproducible_and_has_rate():
    m1 = cpu_masks.cpu_keep_mask(5, (300, 301), 0.1)
    m2 = cpu_masks.cpu_keep_mask(5, (300, 301), 0.1)
    m3 = cpu_masks.cpu_keep_mask(6, (300, 301), 0.1)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    as_float = cpu_masks.cpu_keep_mask(5, (300, 301), 0.1, torch.float32)
    assert torch.equal(as_float, m1.float())  # the 0/1 form is the same mask
    n = m1.numel()
    rate = m1.float().mean().item()
    # 6 standard deviations of a Binomial(n, 0.9) proportion
    assert abs(rate - 0.9) < 6 * (0.9 * 0.1 / n) ** 0.5


def test_cpu_keep_mask_extremes():
    assert cpu_masks.cpu_keep_mask(1, (4, 5), 0.0).all()
    assert not cpu_masks.cpu_keep_mask(1, (4, 5), 1.0).any()
    almost = cpu_masks.cpu_keep_mask(1, (512, 512), 1 - 2**-15)  # keeps 8 in 2^18 on average
    assert 0 < almost.sum() < 40
    empty = cpu_masks.cpu_keep_mask(1, (0, 5), 0.1)
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("p", [0.02, 0.1, 0.15, 0.3, 0.5, 0.85, 0.97])
def test_cpu_keep_rate_for_each_sampler(p):
    """Rare drops and rare keeps are sampled by geometric gaps, the rest per element: each keeps 1-p."""
    mask = cpu_masks.cpu_keep_mask(11, (1000, 999), p, torch.float32)
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(mask, cpu_masks.cpu_keep_mask(11, (1000, 999), p, torch.float32))


def test_geometric_gaps_match_bernoulli_runs():
    """With p = 0.1 the runs of kept elements between drops are Geometric(0.1): compare the counts of
    run lengths 0..4 with their expectation (chi-square with 5 cells, far tail cut-off)."""
    mask = cpu_masks.cpu_keep_mask(3, (2000, 1000), 0.1)
    drops = (~mask.view(-1)).nonzero().view(-1)
    runs = drops[1:] - drops[:-1] - 1
    n = runs.numel()
    chi2 = 0.0
    for g in range(5):
        expected = n * 0.9**g * 0.1
        chi2 += (int((runs == g).sum()) - expected) ** 2 / expected
    assert chi2 < 25.0  # P(chi2_5 > 25) ≈ 1e-4


def test_zero_dropped_applies_the_mask_in_place():
    for p in (0.1, 0.4, 0.9):
        t = torch.randn(37, 41)
        expected = t * cpu_masks.cpu_keep_mask(5, (37, 41), p, torch.float32)
        out = cpu_masks.zero_dropped_(t, 5, p)
        assert out is t and torch.equal(t, expected)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_masks.zero_dropped_(torch.randn(4, 6).t(), 5, 0.1)


def test_masks_from_concurrent_threads_are_each_their_seeds():
    """Each thread reseeds its own generator: masks drawn concurrently equal the ones drawn alone."""
    import threading

    seeds = list(range(8))
    alone = {s: cpu_masks.cpu_keep_mask(s, (256, 300), 0.1 if s % 2 else 0.4) for s in seeds}
    got = {}

    def draw(s):
        for _ in range(20):
            got[s] = cpu_masks.cpu_keep_mask(s, (256, 300), 0.1 if s % 2 else 0.4)
            if not torch.equal(got[s], alone[s]):
                return

    threads = [threading.Thread(target=draw, args=(s,)) for s in seeds]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(got[s], alone[s]) for s in seeds)


@pytest.mark.parametrize("p", [2.6e-284, 5e-324, 1e-12])
def test_a_vanishing_dropout_probability_drops_nothing_and_does_not_fail(p):
    """Geometric gaps of a tiny p are astronomically long (inf for the smallest): nothing is dropped, and the
    positions never overflow."""
    for shape in [(1, 1), (7, 13)]:
        assert cpu_masks.cpu_keep_mask(3, shape, p).all()
    assert cpu_masks.rare_dropped_positions(3, 7, 13, p)[0].numel() == 0


def _one_segment_at_a_time(stacked, counts, seeds, ps):
    """Each segment's mask as one zero_dropped_ call on its rows draws it (each part of a 4-D stack alike)."""
    for e, (count, seed, p) in enumerate(zip(counts, seeds, ps)):
        if seed is None or p == 0.0 or count == 0:
            continue
        segment = stacked[e]
        for part in (segment,) if segment.dim() == 2 or count == segment.shape[-2] else segment:
            cpu_masks.zero_dropped_(part[..., :count, :], seed, p)
    return stacked


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_segments_masks_are_each_segments_own_call():
    """zero_dropped_segments_ (the rare-drop segments drawn in one batch of ops) applies, element for element, the
    mask one zero_dropped_ call per segment applies: unequal and empty segments, every sampler, no seed, parts
    sharing a mask, NaNs (dropped ones stay NaN), three dtypes."""
    import random

    rng = random.Random(0)
    for _ in range(150):
        k, K, longest = rng.randint(1, 6), rng.choice([1, 3, 16, 64]), rng.randint(1, 40)
        counts = [rng.randint(0, longest) for _ in range(k)]
        counts[rng.randrange(k)] = longest
        seeds = [rng.choice([None, rng.randrange(2**62)]) for _ in range(k)]
        ps = [rng.choice([0.0, 1e-6, 0.05, 0.1, 0.15, 0.3, 0.9]) for _ in range(k)]
        parts = rng.choice([(), (1,), (2,)])
        t = torch.randn(k, *parts, longest, K, dtype=rng.choice([torch.float32, torch.float64, torch.bfloat16]))
        if rng.random() < 0.3:
            t.view(-1)[rng.randrange(t.numel())] = float("nan")
        expected = _one_segment_at_a_time(t.clone(), counts, seeds, ps)
        assert _same(cpu_masks.zero_dropped_segments_(t.clone(), counts, seeds, ps), expected), (counts, seeds, ps)


def test_segments_masks_whose_batch_of_gaps_ends_short(monkeypatch):
    """A segment whose first batch of gaps ends before its last element (six standard deviations off, forced here
    with batches of 5 gaps) is drawn again on its own: still its own call's mask."""
    monkeypatch.setattr(cpu_masks, "_draw_count", lambda left, q: 5)
    cpu_masks._batch_constants.cache_clear()  # (the gap counts are cached per segment sizes and p)
    t = torch.randn(3, 2, 8, 16)
    counts, seeds, ps = [8, 5, 8], [11, 12, 13], [0.1, 0.15, 0.05]
    expected = _one_segment_at_a_time(t.clone(), counts, seeds, ps)
    assert (expected == 0).sum() > 30  # the many short batches drew the whole mask
    assert _same(cpu_masks.zero_dropped_segments_(t.clone(), counts, seeds, ps), expected)
    cpu_masks._batch_constants.cache_clear()
