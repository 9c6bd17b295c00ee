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
