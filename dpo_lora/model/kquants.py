"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K, quantized in numpy (the `gguf` package reads them but
cannot write them), for GGUF exports of types `q4_k_m`, `q5_k_m` and `q6_k`.

All work on super-blocks of 256 values of a row:
  Q4_K  8 sub-blocks of 32, each x ~ d * sc * q - dmin * m with q in 0..15, and 6-bit sc and m
        per sub-block under the super-block's float16 d and dmin: 4.5 bits a weight.
  Q5_K  as Q4_K with q in 0..31, its fifth bits apart: 5.5 bits a weight.
  Q6_K  16 groups of 16, each x ~ d * sc * q with q in -32..31 and an int8 sc per group under the
        super-block's float16 d: 6.5625 bits a weight.

Each group's scale (and Q4_K's offset) is chosen as llama.cpp does, in spirit: several candidate
scales around the range's, each followed by the weighted least-squares scale and offset for the
integers it gave, keeping the one with the smallest weighted squared error (weights favouring the
large values, as llama.cpp's). The byte layouts are llama.cpp's; tests
read the bytes back with the `gguf` package's own dequantizers.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2  # d, dmin, packed 6-bit scales and mins, 4-bit values
Q5_K_BYTES = 2 + 2 + 12 + QK_K // 8 + QK_K // 2  # d, dmin, scales and mins, fifth bits, low 4 bits
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # low 4 bits, high 2 bits, int8 scales, d
CANDIDATES = np.linspace(-1.0, 1.0, 11, dtype=np.float32)  # offsets to the integer range tried per group


def _fit_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) >= 0 per row of x [groups, n], x ~ scale * q - offset with q in 0..levels:
    the candidate scales, each followed by its weighted least-squares refit, the smallest weighted
    error kept. Weights as llama.cpp's Q4_K: the row's RMS plus |x|, so the large weights, which
    matter most, are the last to be clipped. The offset stays >= 0 (llama.cpp's min <= 0)."""
    w = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)
    low = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - low
    span = np.where(span > 0, span, 1.0)
    best_scale, best_offset = span / levels, -low
    best_error = _affine_error(x, w, best_scale, best_offset, levels)
    sw, swx = w.sum(1), (w * x).sum(1)
    for step in CANDIDATES:
        inverse = (levels + step) / span
        q = np.clip(np.rint((x - low[:, None]) * inverse[:, None]), 0, levels)
        # Weighted least squares for x ~ scale * q + bias given q; bias = -offset must stay <= 0.
        swq, swqq, swqx = (w * q).sum(1), (w * q * q).sum(1), (w * q * x).sum(1)
        det = sw * swqq - swq * swq
        safe = np.where(det > 0, det, 1.0)
        scale = np.where(det > 0, (sw * swqx - swq * swx) / safe, best_scale)
        bias = np.where(det > 0, (swqq * swx - swq * swqx) / safe, -best_offset)
        # A positive bias is clamped to 0: then the scale is the fit through the origin.
        through_origin = np.where(swqq > 0, swqx / np.where(swqq > 0, swqq, 1.0), scale)
        scale, bias = np.where(bias > 0, through_origin, scale), np.minimum(bias, 0.0)
        scale = np.maximum(scale, 0.0)
        error = _affine_error(x, w, scale, -bias, levels)
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, -bias, best_offset)
        best_error = np.minimum(error, best_error)
    return best_scale.astype(np.float32), best_offset.astype(np.float32)


def _affine_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, offset: np.ndarray, levels: int) -> np.ndarray:
    safe = np.where(scale > 0, scale, 1.0)
    q = np.where(scale[:, None] > 0, np.clip(np.rint((x + offset[:, None]) / safe[:, None]), 0, levels), 0)
    return (w * (scale[:, None] * q - offset[:, None] - x) ** 2).sum(axis=1)


def _six_bit(values: np.ndarray, top: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """(float16 super-scale [blocks], integers 0..top [blocks, n]) with values (>= 0) ~ super * integers:
    6-bit by default, 4-bit with top 15 (Q2_K)."""
    largest = values.max(axis=1)
    super_scale = (largest / top).astype(np.float16)
    safe = np.where(super_scale > 0, super_scale.astype(np.float32), 1.0)
    return super_scale, np.clip(np.rint(values / safe[:, None]), 0, top).astype(np.uint8)


def q4_k_parts(array: np.ndarray, levels: int = 15) -> tuple[np.ndarray, ...]:
    """Q4_K's numbers for `array` [..., n] (Q5_K's with `levels` 31): (d, dmin) float16 [blocks],
    (sc, m) 6-bit [blocks, 8] and q [blocks, 8, 32] in 0..levels, x ~ d * sc * q - dmin * m."""
    x = np.asarray(array, dtype=np.float32).reshape(-1, 8, 32)
    blocks = x.shape[0]
    scale, offset = _fit_affine(x.reshape(-1, 32), levels)
    d, sc = _six_bit(scale.reshape(blocks, 8))
    dmin, mn = _six_bit(offset.reshape(blocks, 8))
    # The values again, against the scales as stored.
    step = (d.astype(np.float32)[:, None] * sc).reshape(blocks, 8, 1)
    shift = (dmin.astype(np.float32)[:, None] * mn).reshape(blocks, 8, 1)
    q = np.where(step > 0, np.clip(np.rint((x + shift) / np.where(step > 0, step, 1.0)), 0, levels), 0)
    return d, dmin, sc, mn, q.astype(np.uint8)


def _scales_and_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 bytes a k-quant super-block keeps eight 6-bit scales and mins in."""
    return np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of q [blocks, 8, 32]: sub-blocks 2c and 2c + 1 share 32 bytes, low and high nibble."""
    pairs = (q & 0x0F).reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray, q: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q4_K bytes [blocks, 144] of q4_k_parts' numbers."""
    blocks = d.shape[0]
    halves = [d.reshape(blocks, 1).view(np.uint8), dmin.reshape(blocks, 1).view(np.uint8)]
    return np.concatenate([*halves, _scales_and_mins(sc, mn), _nibbles(q)], axis=1)


def pack_q5_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray, q: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q5_K bytes [blocks, 176]: as Q4_K, with byte l of the 32 fifth-bit bytes
    holding bit 4 of value l of every sub-block (sub-block j in bit j)."""
    blocks = d.shape[0]
    fifth = ((q >> 4) & 1).astype(np.uint8)  # [blocks, 8, 32]
    high = np.bitwise_or.reduce(fifth << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    halves = [d.reshape(blocks, 1).view(np.uint8), dmin.reshape(blocks, 1).view(np.uint8)]
    return np.concatenate([*halves, _scales_and_mins(sc, mn), high, _nibbles(q)], axis=1)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 256) as Q4_K bytes [..., n / 256 * 144]."""
    shape = array.shape
    return pack_q4_k(*q4_k_parts(array)).reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BYTES)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 256) as Q5_K bytes [..., n / 256 * 176]."""
    shape = array.shape
    return pack_q5_k(*q4_k_parts(array, levels=31)).reshape(*shape[:-1], shape[-1] // QK_K * Q5_K_BYTES)


def _fit_symmetric(x: np.ndarray, half: int = 32) -> np.ndarray:
    """Scale per row of x [groups, n], x ~ scale * q with q in -half..half-1 (Q6_K: 32, Q3_K: 4): the
    candidate scales around the one that maps the largest magnitude to -half, each with its
    least-squares refit weighted by x^2 (llama.cpp's Q6_K weighting: the large weights are the last
    to be clipped)."""
    w = x * x
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    best_scale = np.where(extreme != 0, extreme / -half, 0.0).astype(np.float32)
    best_error = _symmetric_error(x, w, best_scale, half)
    for step in CANDIDATES:  # up to one integer step either way
        inverse = np.where(extreme != 0, -(half + step) / np.where(extreme != 0, extreme, 1.0), 0.0)
        q = np.clip(np.rint(x * inverse[:, None]), -half, half - 1)
        swqq = (w * q * q).sum(1)
        scale = np.where(swqq > 0, (w * q * x).sum(1) / np.where(swqq > 0, swqq, 1.0), 0.0)
        error = _symmetric_error(x, w, scale, half)
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_error = np.minimum(error, best_error)
    return best_scale.astype(np.float32)


def _symmetric_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    safe = np.where(scale != 0, scale, 1.0)
    q = np.where(scale[:, None] != 0, np.clip(np.rint(x / safe[:, None]), -half, half - 1), 0)
    return (w * (scale[:, None] * q - x) ** 2).sum(axis=1)


def symmetric_parts(array: np.ndarray, half: int, scale_half: int) -> tuple[np.ndarray, ...]:
    """Numbers of a symmetric k-quant (Q6_K: half 32, scale_half 128; Q3_K: 4, 32) for `array` [..., n]:
    d float16 [blocks], sc in -scale_half..scale_half-1 [blocks, 16] and q in -half..half-1
    [blocks, 16, 16], x ~ d * sc * q per group of 16. The group scales go under d with the largest
    magnitude at -scale_half, as llama.cpp stores them."""
    x = np.asarray(array, dtype=np.float32).reshape(-1, 16, 16)
    blocks = x.shape[0]
    scale = _fit_symmetric(x.reshape(-1, 16), half).reshape(blocks, 16)
    extreme = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = np.where(extreme != 0, extreme / -scale_half, 0.0).astype(np.float16)
    safe = np.where(d != 0, d.astype(np.float32), 1.0)
    sc = np.where(d[:, None] != 0, np.clip(np.rint(scale / safe[:, None]), -scale_half, scale_half - 1), 0)
    step = (d.astype(np.float32)[:, None] * sc).reshape(blocks, 16, 1)
    q = np.where(step != 0, np.clip(np.rint(x / np.where(step != 0, step, 1.0)), -half, half - 1), 0)
    return d, sc.astype(np.int8), q.astype(np.int8)


def q6_k_parts(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q6_K's numbers for `array` [..., n]: d float16 [blocks], int8 sc [blocks, 16] and q in -32..31
    [blocks, 16, 16], with x ~ d * sc * q per group of 16."""
    return symmetric_parts(array, half=32, scale_half=128)


def pack_q6_k(d: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q6_K bytes [blocks, 210] of q6_k_parts' numbers."""
    blocks = d.shape[0]
    stored = (q.astype(np.int16) + 32).astype(np.uint8).reshape(blocks, 2, 128)  # two halves of 128 values
    low, high = stored & 0x0F, stored >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(blocks, 128)
    quarters = high.reshape(blocks, 2, 4, 32)
    qh = quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(blocks, 64), sc.view(np.uint8), d.reshape(blocks, 1).view(np.uint8)], axis=1)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """Rows of `array` [..., n] (n a multiple of 256) as Q6_K bytes [..., n / 256 * 210]."""
    shape = array.shape
    return pack_q6_k(*q6_k_parts(array)).reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BYTES)
