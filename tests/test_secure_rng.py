"""Secure randomness: the CSPRNG that draws DP noise and patient samples.

The distribution tests draw a fixed number of values from an unseeded CSPRNG, so each
bound is set where a correct generator fails it with probability below 1e-8; a positive
control shows each bound rejects a slightly wrong distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from client import secure_rng
from client.secure_rng import ChaCha20Random

CPU = torch.device("cpu")
N = 2**20
# Kolmogorov-Smirnov: P(D > sqrt(ln(2 / alpha) / (2 n))) <= alpha (DKW), alpha = 1e-9.
KS_BOUND = math.sqrt(math.log(2 / 1e-9) / (2 * N))
SIX_SE = 6 / math.sqrt(N)  # six standard errors of a mean of N unit-variance values


def ks_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample ``z`` and N(0, 1)."""
    z = z.double().flatten().sort().values
    cdf = torch.special.ndtr(z)
    n = len(z)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def test_normals_are_standard():
    z = ChaCha20Random().standard_normal(N)
    assert z.dtype == torch.float64 and z.shape == (N,)
    assert abs(float(z.mean())) < SIX_SE
    assert abs(float(z.var()) - 1) < SIX_SE * math.sqrt(2)  # var of a variance: 2 / N
    assert ks_normal(z) < KS_BOUND
    # The positive control: 5% too wide is rejected (its distance is ~0.012).
    assert ks_normal(1.05 * z) > KS_BOUND


def test_noise_is_sigma_times_standard_normal_in_the_reference_dtype():
    reference = torch.zeros(N // 4, 4, dtype=torch.float32)
    noise = ChaCha20Random().gaussian_like(reference, 2.5)
    assert (noise.shape, noise.dtype, noise.device) == (reference.shape, torch.float32, CPU)
    assert ks_normal(noise / 2.5) < KS_BOUND
    assert ks_normal(noise / 2.4) > KS_BOUND
    assert torch.equal(ChaCha20Random().gaussian_like(reference, 0.0), reference)


def test_uniforms_have_53_random_bits_in_0_1():
    u = ChaCha20Random().uniform(N)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    k = (u * 2.0**53).long()
    assert torch.equal(k.double(), u * 2.0**53)  # multiples of 2^-53
    # The 53rd bit is random too (float32's 24 bits would leave it always 0).
    assert abs(float(k.bitwise_and(1).double().mean()) - 0.5) < SIX_SE / 2
    sorted_u = u.sort().values
    grid = torch.arange(1, N + 1, dtype=torch.float64) / N
    assert float((grid - sorted_u).abs().max()) < KS_BOUND + 1 / N


def test_a_fresh_key_before_the_stream_would_wrap(monkeypatch):
    keys: list[int] = []
    urandom = secure_rng.os.urandom

    def counted(n: int) -> bytes:
        keys.append(n)
        return urandom(n)

    monkeypatch.setattr(secure_rng, "_REKEY_BYTES", 64)
    monkeypatch.setattr(secure_rng.os, "urandom", counted)
    rng = ChaCha20Random()
    words = rng.words(20)  # 160 bytes: the first key's 64, the second's 64, a third's 32
    assert keys == [32, 32, 32]
    assert len(set(words.tolist())) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_noise_on_the_gpu_comes_from_host_bits():
    reference = torch.zeros(N, device="cuda")
    noise = ChaCha20Random().gaussian_like(reference, 1.0)
    assert noise.device == reference.device and noise.dtype == torch.float32
    assert ks_normal(noise.cpu()) < KS_BOUND
