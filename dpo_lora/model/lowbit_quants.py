"""llama.cpp's 2- and 3-bit k-quants and IQ4_NL in numpy, for GGUF exports of types `q2_k` and
`q3_k_s`/`q3_k_m`/`q3_k_l` (the `gguf` package reads them but cannot write them).

  Q2_K    16 groups of 16 in a super-block of 256, x ~ d * sc * q - dmin * m with q in 0..3 and 4-bit sc
          and m under the super-block's float16 d and dmin: 2.625 bits a weight.
  Q3_K    16 groups of 16, x ~ d * sc * q with q in -4..3 and a 6-bit signed sc under a float16 d:
          3.4375 bits a weight.
  IQ4_NL  blocks of 32, x ~ d * K[i] with i in 0..15 indexing llama.cpp's non-linear table K (denser
          near zero, where most weights are) under a float16 d: 4.5 bits a weight. llama.cpp's
          fallback for Q2_K and Q3_K where rows do not split into super-blocks of 256.

The groups are fitted as dpo_lora.model.kquants fits Q4_K and Q6_K (candidate scales, each refitted by
weighted least squares); IQ4_NL's scale likewise, each candidate's values the nearest entries of K. The
byte layouts are llama.cpp's; tests read the bytes back with the `gguf` package's dequantizers.
"""

from __future__ import annotations

import numpy as np

from dpo_lora.model.kquants import CANDIDATES, QK_K, _fit_affine, _six_bit, symmetric_parts

Q2_K_BYTES = QK_K // 16 + QK_K // 4 + 2 + 2  # 4-bit scales and mins, 2-bit values, d, dmin
Q3_K_BYTES = QK_K // 8 + QK_K // 4 + 12 + 2  # high bits, low 2 bits, 6-bit scales, d
IQ4_NL_BLOCK = 32
IQ4_NL_BYTES = 2 + IQ4_NL_BLOCK // 2  # d, 4-bit indices
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def q2_k_parts(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q2_K's numbers for `array` [..., n]: (d, dmin) float16 [blocks], (sc, m) 4-bit [blocks, 16] and q in
    0..3 [blocks, 16, 16], x ~ d * sc * q - dmin * m per group of 16."""
    x = np.asarray(array, dtype=np.float32).reshape(-1, 16, 16)
    blocks = x.shape[0]
    scale, offset = _fit_affine(x.reshape(-1, 16), 3)
    d, sc = _six_bit(scale.reshape(blocks, 16), top=15)
    dmin, mn = _six_bit(offset.reshape(blocks, 16), top=15)
    step = (d.astype(np.float32)[:, None] * sc).reshape(blocks, 16, 1)
    shift = (dmin.astype(np.float32)[:, None] * mn).reshape(blocks, 16, 1)
    q = np.where(step > 0, np.clip(np.rint((x + shift) / np.where(step > 0, step, 1.0)), 0, 3), 0)
    return d, dmin, sc, mn, q.astype(np.uint8)


def _two_bit_planes(values: np.ndarray) -> np.ndarray:
    """Values 0..3 [blocks, 256] as llama.cpp's 64 bytes: value c * 128 + s * 32 + j in bits 2s of byte
    c * 32 + j."""
    planes = values.reshape(values.shape[0], 2, 4, 32)
    return (planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)).reshape(-1, 64)


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray, q: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q2_K bytes [blocks, 84] of q2_k_parts' numbers."""
    blocks = d.shape[0]
    halves = [d.reshape(blocks, 1).view(np.uint8), dmin.reshape(blocks, 1).view(np.uint8)]
    return np.concatenate([sc | (mn << 4), _two_bit_planes(q.reshape(blocks, QK_K)), *halves], axis=1)


def q3_k_parts(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q3_K's numbers for `array` [..., n]: d float16 [blocks], sc in -32..31 [blocks, 16] and q in -4..3
    [blocks, 16, 16], x ~ d * sc * q per group of 16."""
    return symmetric_parts(array, half=4, scale_half=32)


def pack_q3_k(d: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q3_K bytes [blocks, 110] of q3_k_parts' numbers: q + 4 split into its low two
    bits (as Q2_K's) and a high bit (value s * 32 + j in bit s of mask byte j); the scales + 32 as 6 bits,
    low nibbles of 0-7 and 8-15 sharing bytes 0-7, the top two bits of scale 4s + b in bits 2s of byte 8 + b."""
    blocks = d.shape[0]
    stored = (q.astype(np.int16) + 4).astype(np.uint8).reshape(blocks, QK_K)
    high = (stored >> 2).reshape(blocks, 8, 32)
    mask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    scales = (sc.astype(np.int16) + 32).astype(np.uint8)
    low_nibbles = (scales[:, :8] & 0x0F) | ((scales[:, 8:] & 0x0F) << 4)
    tops = ((scales >> 4) & 0x03).reshape(blocks, 4, 4)
    top_bytes = np.bitwise_or.reduce(tops << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1), axis=1)
    planes = [mask, _two_bit_planes(stored & 0x03), low_nibbles, top_bytes, d.reshape(blocks, 1).view(np.uint8)]
    return np.concatenate(planes, axis=1)


def iq4_nl_parts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_NL's numbers for `array` [..., n] (n a multiple of 32): d float16 [blocks] and indices into
    IQ4_NL_VALUES [blocks, 32], x ~ d * K[index]. Candidate scales put the largest magnitude at K's ends
    (-127 or 113) and around them; for each candidate's indices the least-squares scale weighted by x^2
    has the weighted error sum w x^2 - (sum w K x)^2 / sum w K^2, so the candidate with the largest
    (sum w K x)^2 / sum w K^2 is kept (as llama.cpp chooses), and its indices are taken again under the
    float16 d."""
    x = np.asarray(array, dtype=np.float32).reshape(-1, IQ4_NL_BLOCK)
    w = x * x
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    safe_extreme = np.where(extreme != 0, extreme, 1.0)
    best_scale = np.zeros(x.shape[0], dtype=np.float32)
    best_score = np.full(x.shape[0], -1.0, dtype=np.float32)
    for end in (IQ4_NL_VALUES[0], IQ4_NL_VALUES[-1]):
        for step in CANDIDATES * 8:  # about one table step either way
            k = IQ4_NL_VALUES[_nearest(x * ((end + step) / safe_extreme)[:, None])]
            wk = w * k
            swkx, swkk = (wk * x).sum(1), (wk * k).sum(1)
            safe = np.where(swkk > 0, swkk, 1.0)
            score = np.where(swkk > 0, swkx * swkx / safe, 0.0)
            better = score > best_score
            best_scale = np.where(better, np.where(swkk > 0, swkx / safe, 0.0), best_scale)
            best_score = np.maximum(score, best_score)
    d = best_scale.astype(np.float16)
    safe = np.where(d != 0, d.astype(np.float32), 1.0)
    index = np.where(d[:, None] != 0, _nearest(x / safe[:, None]), _nearest(np.zeros_like(x)))
    return d, index.astype(np.uint8)


_MIDPOINTS = (IQ4_NL_VALUES[1:] + IQ4_NL_VALUES[:-1]) / 2  # all multiples of 0.5: the table is integers
_HALF_STEPS = np.arange(-260, 260)  # [j / 2, (j + 1) / 2) for j in -260..259 covers the table and past it
_NEAREST_BY_HALF_STEP = np.searchsorted(_MIDPOINTS, (_HALF_STEPS + 0.5) / 2).astype(np.uint8)


def _nearest(y: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL_VALUES entry to each of y. No midpoint falls inside a half-integer
    interval [j / 2, (j + 1) / 2), so one lookup by floor(2y) is exact (a value on a midpoint, equally
    near both, may go either way)."""
    steps = np.clip(np.floor(2 * y), _HALF_STEPS[0], _HALF_STEPS[-1]).astype(np.int16) - _HALF_STEPS[0]
    return _NEAREST_BY_HALF_STEP[steps]


def pack_iq4_nl(d: np.ndarray, index: np.ndarray) -> np.ndarray:
    """llama.cpp's block_iq4_nl bytes [blocks, 18]: d, then value j in the low nibble of byte j and value
    16 + j in its high nibble."""
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), index[:, :16] | (index[:, 16:] << 4)], axis=1)


def _rows(quantized: np.ndarray, shape: tuple[int, ...], block: int, size: int) -> np.ndarray:
    return quantized.reshape(*shape[:-1], shape[-1] // block * size)


def quantize_q2_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 256) as Q2_K bytes [..., n / 256 * 84]."""
    return _rows(pack_q2_k(*q2_k_parts(array)), array.shape, QK_K, Q2_K_BYTES)


def quantize_q3_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 256) as Q3_K bytes [..., n / 256 * 110]."""
    return _rows(pack_q3_k(*q3_k_parts(array)), array.shape, QK_K, Q3_K_BYTES)


def quantize_iq4_nl(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 32) as IQ4_NL bytes [..., n / 32 * 18]."""
    return _rows(pack_iq4_nl(*iq4_nl_parts(array)), array.shape, IQ4_NL_BLOCK, IQ4_NL_BYTES)
