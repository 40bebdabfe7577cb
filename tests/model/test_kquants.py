"""Q4_K and Q6_K written in numpy, read back by the `gguf` package's own dequantizers: the byte
layout against a float64 reconstruction of the numbers packed, the fitting against the legacy
types of about as many bits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from dpo_lora.model.kquants import (
    pack_q4_k,
    pack_q5_k,
    pack_q6_k,
    q4_k_parts,
    q6_k_parts,
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
)

KINDS = gguf.GGMLQuantizationType


def weights(rows=48, columns=1024, seed=0) -> np.ndarray:
    """Weight-like rows: Gaussian, a few outliers, an all-zero row and a constant one."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)
    x[3, :7] = [0.4, -0.3, 0.25, 0.5, -0.45, 0.3, 0.2]
    x[5] = 0.0
    x[6] = 0.01
    return x


@pytest.mark.parametrize(("pack", "kind", "levels", "size"), [(pack_q4_k, KINDS.Q4_K, 16, 144), (pack_q5_k, KINDS.Q5_K, 32, 176)], ids=["q4_k", "q5_k"])  # fmt: skip
def test_q4_k_and_q5_k_bytes_are_the_numbers_packed_as_llama_cpp_reads_them(pack, kind, levels, size):
    rng = np.random.default_rng(1)
    blocks = 5
    d = rng.uniform(1e-4, 1e-2, blocks).astype(np.float16)
    dmin = rng.uniform(1e-4, 1e-2, blocks).astype(np.float16)
    sc, mn = (rng.integers(0, 64, (blocks, 8)).astype(np.uint8) for _ in range(2))
    q = rng.integers(0, levels, (blocks, 8, 32)).astype(np.uint8)
    packed = pack(d, dmin, sc, mn, q)
    assert packed.shape == (blocks, size) and packed.dtype == np.uint8
    oracle = d.astype(np.float64)[:, None, None] * sc[..., None] * q - dmin.astype(np.float64)[:, None, None] * mn[..., None]  # fmt: skip
    read = gguf.quants.dequantize(packed, kind).reshape(blocks, 8, 32)
    np.testing.assert_allclose(read, oracle, rtol=1e-6, atol=1e-9)


def test_q6_k_bytes_are_the_numbers_packed_as_llama_cpp_reads_them():
    rng = np.random.default_rng(2)
    blocks = 5
    d = rng.uniform(-1e-3, 1e-3, blocks).astype(np.float16)
    sc = rng.integers(-128, 128, (blocks, 16)).astype(np.int8)
    q = rng.integers(-32, 32, (blocks, 16, 16)).astype(np.int8)
    packed = pack_q6_k(d, sc, q)
    assert packed.shape == (blocks, 210) and packed.dtype == np.uint8
    oracle = d.astype(np.float64)[:, None, None] * sc[..., None].astype(np.float64) * q
    read = gguf.quants.dequantize(packed, KINDS.Q6_K).reshape(blocks, 16, 16)
    np.testing.assert_allclose(read, oracle, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("quantize", "kind", "parts", "legacy"),
    [
        (quantize_q4_k, KINDS.Q4_K, q4_k_parts, KINDS.Q4_0),
        (quantize_q5_k, KINDS.Q5_K, lambda x: q4_k_parts(x, levels=31), KINDS.Q5_0),
        (quantize_q6_k, KINDS.Q6_K, q6_k_parts, KINDS.Q5_0),
    ],
    ids=["q4_k", "q5_k", "q6_k"],
)
def test_a_quantized_tensor_reads_back_closer_than_the_legacy_type_of_fewer_bits(quantize, kind, parts, legacy):
    """Q4_K (4.5 bits a weight) against Q4_0 (4.5), Q5_K (5.5) and Q6_K (6.56) against Q5_0 (5.5):
    the k-quants' finer scales must give a smaller error, zeros stay exact, and every row is within
    its range."""
    x = weights()
    stored = quantize(x)
    assert stored.shape == (48, 1024 // 256 * gguf.GGML_QUANT_SIZES[kind][1])
    back = gguf.quants.dequantize(stored, kind).reshape(x.shape)
    legacy_back = gguf.quants.dequantize(gguf.quants.quantize(x, legacy), legacy).reshape(x.shape)

    def rms(a):
        return float(np.sqrt(((a - x.astype(np.float64)) ** 2).mean()))

    assert rms(back) < 0.9 * rms(legacy_back), (rms(back), rms(legacy_back))
    assert np.array_equal(back[5], np.zeros(1024)), "an all-zero row stays zero"
    assert np.abs(back[6] - 0.01).max() < 1e-4, "a constant row stays near its value"
    assert np.abs(back - x).max(axis=1).max() < 0.1 * np.abs(x).max()
    # quantize is the parts packed: the same values whichever way they are read.
    numbers = parts(x)
    packer = {KINDS.Q4_K: pack_q4_k, KINDS.Q5_K: pack_q5_k, KINDS.Q6_K: pack_q6_k}[kind]
    assert np.array_equal(packer(*numbers).reshape(stored.shape), stored)
