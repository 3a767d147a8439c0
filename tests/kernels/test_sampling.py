"""The race sampler's noise: exact 32-bit hashing, keyed per row, Exp(1) values, and draws by the race."""
from __future__ import annotations

import numpy as np
import torch

from llmrpc.kernels.sampling import _mul32, exponential_from_bits, race_bits, race_sample, race_sample_torch


def test_mul32_is_multiplication_mod_2_to_the_32() -> None:
    xs = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    for c in (0x7FEB352D, 0x846CA68B):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % 2**32 for x in xs]


def test_bits_depend_on_the_key_and_token_only() -> None:
    keys = torch.tensor([3, 2**40 + 3, 3, 2**62 + 17], dtype=torch.int64)
    bits = race_bits(keys, 5000)
    assert bits.min() >= 0 and bits.max() < 2**32
    assert torch.equal(bits[0], bits[2])  # same key, same noise, whatever the row
    assert not torch.equal(bits[0], bits[1])  # the high half of the key counts too
    assert torch.equal(race_bits(keys[3:], 5000)[0], bits[3])  # independent of the other rows
    # Roughly uniform: each of 16 buckets of the top 4 bits holds ~1/16 of 20,000 values.
    buckets = np.bincount((bits >> 28).flatten().numpy(), minlength=16)
    assert buckets.min() > 1100 and buckets.max() < 1400


def test_noise_is_exponential() -> None:
    noise = exponential_from_bits(race_bits(torch.arange(20, dtype=torch.int64), 10000))
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert abs(float(noise.mean()) - 1.0) < 0.01 and abs(float(noise.var()) - 1.0) < 0.03
    # The series branch for small w agrees with the log it replaces.
    w = torch.tensor([1e-3 * (1 - 2**-20)], dtype=torch.float64)
    bits = (w * 2**32).long()
    torch.testing.assert_close(exponential_from_bits(bits).double(), -torch.log1p(-(bits.double() + 0.5) / 2**32),
                               rtol=1e-6, atol=0)


def test_race_is_argmax_of_scaled_logits_minus_log_noise() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 2
    inv_t = torch.tensor([1.0, 2.0, 0.5, 1 / 0.6])
    keys = torch.tensor([9, 10, 11, 12], dtype=torch.int64)
    noise = exponential_from_bits(race_bits(keys, 300))
    expected = (logits * inv_t[:, None] - noise.log()).argmax(-1)
    assert torch.equal(race_sample_torch(logits, inv_t, keys), expected)
    assert torch.equal(race_sample(logits, inv_t, keys), expected)  # CPU tensors take the reference
