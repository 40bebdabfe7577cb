"""Q2_K, Q3_K and IQ4_NL written in numpy, read back by the `gguf` package's own dequantizers: the byte
layout against a float64 reconstruction of the numbers packed, and the fitting against plain
quantizers of as many bits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from dpo_lora.model.lowbit_quants import (
    IQ4_NL_VALUES,
    iq4_nl_parts,
    pack_iq4_nl,
    pack_q2_k,
    pack_q3_k,
    q2_k_parts,
    q3_k_parts,
    quantize_iq4_nl,
    quantize_q2_k,
    quantize_q3_k,
)

from .test_kquants import weights

KINDS = gguf.GGMLQuantizationType


def rms(approximation: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(((approximation - x.astype(np.float64)) ** 2).mean()))


def test_q2_k_bytes_are_the_numbers_packed_as_llama_cpp_reads_them():
    rng = np.random.default_rng(1)
    blocks = 5
    d, dmin = (rng.uniform(1e-4, 1e-2, blocks).astype(np.float16) for _ in range(2))
    sc, mn = (rng.integers(0, 16, (blocks, 16)).astype(np.uint8) for _ in range(2))
    q = rng.integers(0, 4, (blocks, 16, 16)).astype(np.uint8)
    packed = pack_q2_k(d, dmin, sc, mn, q)
    assert packed.shape == (blocks, 84) and packed.dtype == np.uint8
    oracle = d.astype(np.float64)[:, None, None] * sc[..., None] * q - dmin.astype(np.float64)[:, None, None] * mn[..., None]  # fmt: skip
    np.testing.assert_allclose(gguf.quants.dequantize(packed, KINDS.Q2_K).reshape(blocks, 16, 16), oracle, rtol=1e-6, atol=1e-9)  # fmt: skip


def test_q3_k_bytes_are_the_numbers_packed_as_llama_cpp_reads_them():
    rng = np.random.default_rng(2)
    blocks = 5
    d = rng.uniform(-1e-3, 1e-3, blocks).astype(np.float16)
    sc = rng.integers(-32, 32, (blocks, 16)).astype(np.int8)
    q = rng.integers(-4, 4, (blocks, 16, 16)).astype(np.int8)
    packed = pack_q3_k(d, sc, q)
    assert packed.shape == (blocks, 110) and packed.dtype == np.uint8
    oracle = d.astype(np.float64)[:, None, None] * sc[..., None].astype(np.float64) * q
    np.testing.assert_allclose(gguf.quants.dequantize(packed, KINDS.Q3_K).reshape(blocks, 16, 16), oracle, rtol=1e-6, atol=1e-9)  # fmt: skip


def test_iq4_nl_bytes_are_the_numbers_packed_as_llama_cpp_reads_them():
    rng = np.random.default_rng(3)
    blocks = 7
    d = rng.uniform(-1e-3, 1e-3, blocks).astype(np.float16)
    index = rng.integers(0, 16, (blocks, 32)).astype(np.uint8)
    packed = pack_iq4_nl(d, index)
    assert packed.shape == (blocks, 18) and packed.dtype == np.uint8
    oracle = d.astype(np.float64)[:, None] * IQ4_NL_VALUES[index].astype(np.float64)
    np.testing.assert_allclose(gguf.quants.dequantize(packed, KINDS.IQ4_NL).reshape(blocks, 32), oracle, rtol=1e-6, atol=1e-9)  # fmt: skip


def plain_affine(x: np.ndarray, group: int, levels: int) -> np.ndarray:
    """Each group's min and max as its range, rounded to the nearest level, scales kept in float64."""
    g = x.reshape(-1, group).astype(np.float64)
    low, high = g.min(1, keepdims=True), g.max(1, keepdims=True)
    step = np.where(high > low, (high - low) / levels, 1.0)
    return (np.clip(np.rint((g - low) / step), 0, levels) * step + low).reshape(x.shape)


def plain_symmetric(x: np.ndarray, group: int, half: int) -> np.ndarray:
    """Each group's largest magnitude mapped to -half, rounded to the nearest of -half..half-1."""
    g = x.reshape(-1, group).astype(np.float64)
    extreme = np.take_along_axis(g, np.abs(g).argmax(1)[:, None], 1)
    step = np.where(extreme != 0, extreme / -half, 1.0)
    return (np.clip(np.rint(g / step), -half, half - 1) * step).reshape(x.shape)


@pytest.mark.parametrize(
    ("quantize", "kind", "parts", "pack", "plain", "within"),
    [
        (quantize_q2_k, KINDS.Q2_K, q2_k_parts, pack_q2_k, lambda x: plain_affine(x, 16, 3), 0.9),
        (quantize_q3_k, KINDS.Q3_K, q3_k_parts, pack_q3_k, lambda x: plain_symmetric(x, 16, 4), 1.0),
        (quantize_iq4_nl, KINDS.IQ4_NL, iq4_nl_parts, pack_iq4_nl, None, 0.95),
    ],
    ids=["q2_k", "q3_k", "iq4_nl"],
)
def test_a_quantized_tensor_reads_back_closer_than_a_plain_quantizer_of_as_many_bits(
    quantize, kind, parts, pack, plain, within
):
    """Q2_K against min-max 2-bit groups of 16 (its scales rounded to 4 bits, theirs exact), Q3_K
    against absmax 3-bit groups of 16 (6-bit scales against exact ones), IQ4_NL against Q4_0 (both 4.5
    bits a weight, blocks of 32): the fitted scales must read back closer; zeros stay exact, and a
    constant row near its value."""
    x = weights()
    stored = quantize(x)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    assert stored.shape == (48, 1024 // block * size)
    back = gguf.quants.dequantize(stored, kind).reshape(x.shape)
    if plain is None:
        plain_back = gguf.quants.dequantize(gguf.quants.quantize(x, KINDS.Q4_0), KINDS.Q4_0).reshape(x.shape)
    else:
        plain_back = plain(x)
    assert rms(back, x) < within * rms(plain_back, x), (rms(back, x), rms(plain_back, x))
    assert np.array_equal(back[5], np.zeros(1024)), "an all-zero row stays zero"
    assert np.abs(back[6] - 0.01).max() < 1e-4, "a constant row stays near its value"
    assert np.array_equal(pack(*parts(x)).reshape(stored.shape), stored)


def test_iq4_nl_picks_the_nearest_table_entry_as_a_brute_force_search_does():
    """The table lookup by half-steps against argmin |y - K| over every entry: random values, values
    past both ends, and each midpoint (equally near two entries: either is nearest)."""
    from dpo_lora.model.lowbit_quants import _nearest

    rng = np.random.default_rng(4)
    midpoints = (IQ4_NL_VALUES[1:] + IQ4_NL_VALUES[:-1]) / 2
    y = np.concatenate([rng.uniform(-400, 400, 100_000), midpoints, midpoints + 1e-3, midpoints - 1e-3]).astype(np.float32)  # fmt: skip
    distance = np.abs(y[:, None] - IQ4_NL_VALUES[None, :])
    picked = distance[np.arange(len(y)), _nearest(y)]
    assert np.array_equal(picked, distance.min(axis=1))
