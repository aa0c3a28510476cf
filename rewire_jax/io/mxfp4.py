"""MXFP4 (OCP microscaling FP4) dequantization of gpt-oss expert weights, exact (spec section 4.3).

Hub layout for a weight W [E, R_out, K_in]:
  `*_blocks` uint8 [E, R_out, K_in/32, 16]: two E2M1 codes per byte, low nibble = element 2j,
            high nibble = element 2j+1 of the 32-element block (blocks run along the input axis);
  `*_scales` uint8 [E, R_out, K_in/32]: one E8M0 exponent per block, factor 2^(s - 127).
Every FP4 value times a power of two is exactly representable in fp32, so this is lossless.
"""
from __future__ import annotations

import numpy as np

# E2M1 code -> value; bit 3 is the sign
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32]."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                         "([..., G, 16] and [..., G])")
    values = np.empty(blocks.shape[:-1] + (32,), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    np.ldexp(values, (scales.astype(np.int32) - 127)[..., None], out=values)
    return values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 32,))
