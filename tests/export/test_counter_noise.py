"""The counter-based generator: Philox4x32-10 against an integer reference, normal statistics,
purity (a function of seed and position only), and that it exports."""

import math

import pytest
import torch
from scipy import stats

from dpcompile import counter_noise
from dpcompile.counter_noise import normal_like, philox4x32, standard_normal

MASK = 0xFFFFFFFF


def philox_reference(counter, key):
    """Philox4x32-10 on Python integers (Salmon et al. 2011), independent of the tensor code."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
    return c


def words(counter, key):
    out = philox4x32(tuple(torch.tensor(v) for v in counter), tuple(torch.tensor(v) for v in key))
    return [int(v) for v in out]


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        # Known-answer vectors of Philox4x32-10 (the Random123 distribution's kat_vectors).
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([MASK] * 4, [MASK, MASK], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ],
)
def test_known_answers(counter, key, expected):
    assert words(counter, key) == expected
    assert philox_reference(counter, key) == expected


def test_matches_integer_reference_on_random_words():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (500, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (500, 2), generator=g, dtype=torch.int64)
    out = torch.stack(philox4x32(tuple(counters.T), tuple(keys.T)), 1)
    for k in range(len(out)):
        assert out[k].tolist() == philox_reference(counters[k].tolist(), keys[k].tolist())


def _wrapping_words(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random counters and keys, half of the counters' multiplied words above 2^31 so that their
    products with Philox's multipliers pass 2^63 (the int64 multiplication wraps)."""
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (n, 4), generator=g, dtype=torch.int64)
    counters[::2, 0] = torch.randint(2**31, 2**32, (len(counters[::2]),), generator=g)
    counters[1::2, 2] = MASK - torch.arange(len(counters[1::2]))
    keys = torch.randint(0, 2**32, (n, 2), generator=g, dtype=torch.int64)
    return counters, keys


def _philox_words(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.stack(philox4x32(tuple(counters.T), tuple(keys.T)), 1)


def _assert_reference_words(out: torch.Tensor, counters: torch.Tensor, keys: torch.Tensor) -> None:
    for k in range(len(out)):
        assert out[k].tolist() == philox_reference(counters[k].tolist(), keys[k].tolist()), k


def test_wrapping_products_give_the_reference_words_in_an_exported_program():
    counters, keys = _wrapping_words(203)

    class Words(torch.nn.Module):
        def forward(self, counters, keys):
            return _philox_words(counters, keys)

    program = torch.export.export(Words(), (counters, keys))
    _assert_reference_words(program.module()(counters, keys), counters, keys)


@pytest.mark.inductor
def test_wrapping_products_give_the_reference_words_through_inductor():
    # 203 rows: Inductor's vectorized loop and its scalar tail both see wrapping products
    counters, keys = _wrapping_words(203)
    compiled = torch.compile(_philox_words, backend="inductor", fullgraph=True)
    _assert_reference_words(compiled(counters, keys), counters, keys)


def test_normals_are_a_function_of_seed_and_position():
    seed = torch.tensor(1234)
    a = standard_normal(seed, 1001)
    b = standard_normal(seed, 4000)
    assert torch.equal(a, b[:1001])  # a prefix does not depend on the total length
    assert not torch.equal(a, standard_normal(torch.tensor(1235), 1001))
    negative = standard_normal(torch.tensor(-1), 16)  # all 64 key bits set
    assert torch.isfinite(negative).all()
    assert not torch.equal(negative, standard_normal(torch.tensor(2**62), 16))


def test_normal_like_splits_one_stream_in_order():
    seed = torch.tensor(7)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    tensors = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    noise = normal_like(seed, tensors)
    flat = standard_normal(seed, sum(math.prod(s) for s in shapes), torch.float64)
    assert [n.shape for n in noise] == [torch.Size(s) for s in shapes]
    assert all(n.dtype == torch.float64 for n in noise)
    torch.testing.assert_close(torch.cat([n.reshape(-1) for n in noise]), flat, rtol=0, atol=0)


def test_standard_normal_statistics():
    n = 400_000
    z = standard_normal(torch.tensor(2024), n, torch.float64)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 0.01
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # neighbours (same block and adjacent blocks) and other seeds are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 0.01
    other = standard_normal(torch.tensor(2025), n, torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.01
    # the float32 Box-Muller tail is cut at sqrt(2 ln 2^24)
    assert float(z.abs().max()) <= math.sqrt(2 * 24 * math.log(2)) + 1e-6


def test_exports_and_runs_identically():
    class Noise(torch.nn.Module):
        def forward(self, seed):
            return standard_normal(seed, 37)

    program = torch.export.export(Noise(), (torch.tensor(0),))
    for seed in (0, 5, -3):
        s = torch.tensor(seed)
        torch.testing.assert_close(program.module()(s), standard_normal(s, 37), rtol=0, atol=0)
    assert counter_noise.GENERATOR_VERSION == 1


def test_rejects_negative_sizes():
    with pytest.raises(ValueError):
        standard_normal(torch.tensor(0), -1)


@pytest.mark.inductor
def test_inductor_matches_eager():
    compiled = torch.compile(lambda s: standard_normal(s, 1000), backend="inductor")
    s = torch.tensor(99)
    torch.testing.assert_close(compiled(s), standard_normal(s, 1000), rtol=1e-5, atol=1e-5)
