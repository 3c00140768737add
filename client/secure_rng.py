"""Cryptographically secure randomness for DP-SGD: patient sampling and Gaussian noise.

The bits come from a ChaCha20 keystream (OpenSSL, through ``cryptography``) keyed from
``os.urandom``: nobody who sees the model updates, nor anybody who knows the torch seed,
can predict or replay the noise or the patients drawn. Only the bits are drawn on the
host; turning them into uniforms and normals is deterministic arithmetic in float64 on the
device that needs them, so a GPU receives one integer tensor per parameter per step.

Noise follows Opacus' ``secure_mode`` construction (Holohan & Braghin 2021, section 5.1,
n = 2): N(0, std^2) as the sum of four N(0, std^2) draws divided by 2, whose floating-point
values leave no gaps that reveal the unnoised value (Mironov 2012; Jin et al. 2021).
Opacus' own secure mode needs ``torchcsprng``, which has no build for our torch.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

NOISE_DRAWS = 4  # normals summed per noise value; their sum is divided by sqrt(4) = 2
_KEY_BYTES = 32
# ChaCha20's block counter is 32 bits (256 GiB of keystream per key); a fresh key long
# before that, so the stream never wraps whatever OpenSSL does at the end of it.
_REKEY_BYTES = 2**36
_MANTISSA = (1 << 53) - 1


class ChaCha20Random:
    """A CSPRNG: the ChaCha20 keystream under a key from ``os.urandom(32)``.

    Not seedable on purpose: two objects, or two runs, never draw the same values.
    """

    def __init__(self) -> None:
        self._rekey()

    def _rekey(self) -> None:
        # A fresh random key per stream, so the all-zero nonce (and counter) is never reused.
        cipher = Cipher(algorithms.ChaCha20(os.urandom(_KEY_BYTES), bytes(16)), mode=None)
        self._stream = cipher.encryptor()
        self._left = _REKEY_BYTES

    def words(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """LongTensor[n] of independent uniform 64-bit words, on ``device``."""
        out = torch.empty(n, dtype=torch.int64)
        view = out.numpy().data.cast("B")
        done = 0
        while done < len(view):
            if self._left == 0:
                self._rekey()
            size = min(len(view) - done, self._left)
            # Encrypting zeros yields the keystream itself.
            self._stream.update_into(bytes(size), view[done : done + size])
            self._left -= size
            done += size
        return out.to(device)

    def uniform(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """DoubleTensor[n] uniform on [0, 1): 53 random bits each (every float64 k / 2^53)."""
        return self._mantissas(n, device).mul_(2.0**-53)

    def standard_normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """DoubleTensor[n] of independent N(0, 1) draws (Box-Muller in float64)."""
        half = (n + 1) // 2
        bits = self._mantissas(2 * half, device)
        # u1 = (k + 1) / 2^53 lies in (0, 1], so the log is finite.
        radius = bits[:half].add_(1.0).mul_(2.0**-53).log_().mul_(-2.0).sqrt_()
        angle = bits[half:].mul_(2.0 * math.pi * 2.0**-53)
        out = torch.empty(2 * half, dtype=torch.float64, device=radius.device)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius, angle.sin_(), out=out[half:])
        return out[:n]

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise of ``reference``'s shape, dtype and device; zeros if std is 0.

        Each value is ``std * (z1 + z2 + z3 + z4) / 2`` with the z standard normals, summed
        in float64 and rounded once to ``reference.dtype``.
        """
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        draws = self.standard_normal(NOISE_DRAWS * n, reference.device).view(NOISE_DRAWS, n)
        noise = draws.sum(dim=0).mul_(std / math.sqrt(NOISE_DRAWS))
        return noise.view(reference.shape).to(reference.dtype)

    def _mantissas(self, n: int, device: torch.device | str) -> torch.Tensor:
        """DoubleTensor[n] of uniform integers in [0, 2^53), exact in float64."""
        return self.words(n, device).bitwise_and_(_MANTISSA).to(torch.float64)
