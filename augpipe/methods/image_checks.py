"""Pure-numpy checks on RGB images: the back-imagination reject filter (METHODS 1.1) and its scores.

Every function takes an ``(H, W, 3)`` array of 0..255 values (``uint8`` or any real dtype) so that it can
be tested without a model or an image library. Two kinds of generated image are rejects:

- **black**: the mean intensity over all pixels and channels is below a threshold. Safety checkers
  replace a flagged output by an all-zero image, and a diverged sampler can produce one too.
- **grayscale**: the mean over pixels of the channel spread (max minus min of R, G, B) is below a
  threshold. A truly gray image has spread 0; JPEG-like noise leaves a spread of a few levels.

``colorfulness`` is the Hasler & Süsstrunk (2003) metric M3, a recorded score, not a verdict.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Verdict = Literal["black", "grayscale"]


def as_rgb_array(image: object) -> np.ndarray:
    """An ``(H, W, 3)`` float64 array from a PIL image or an array; raises ValueError for other shapes."""
    if hasattr(image, "convert") and hasattr(image, "mode"):
        image = image.convert("RGB")  # type: ignore[attr-defined]
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) RGB image, got shape {arr.shape}")
    return arr


def mean_intensity(arr: np.ndarray) -> float:
    """Mean over all pixels and channels, 0..255."""
    return float(np.mean(arr))


def channel_spread(arr: np.ndarray) -> float:
    """Mean over pixels of ``max(R, G, B) - min(R, G, B)``: 0 for a gray image, up to 255."""
    arr = np.asarray(arr, dtype=np.float64)
    return float(np.mean(arr.max(axis=2) - arr.min(axis=2)))


def colorfulness(arr: np.ndarray) -> float:
    """Hasler & Süsstrunk M3: ``sqrt(sd_rg² + sd_yb²) + 0.3 · sqrt(mean_rg² + mean_yb²)``.

    With ``rg = R - G`` and ``yb = (R + G) / 2 - B``; 0 for any gray image.
    """
    arr = np.asarray(arr, dtype=np.float64)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    spread = np.hypot(rg.std(), yb.std())
    mean = np.hypot(rg.mean(), yb.mean())
    return float(spread + 0.3 * mean)


def verdict(arr: np.ndarray, black_threshold: float, gray_threshold: float) -> Verdict | None:
    """``"black"`` or ``"grayscale"`` for a reject (black wins when both hold), ``None`` to keep."""
    if mean_intensity(arr) < black_threshold:
        return "black"
    if channel_spread(arr) < gray_threshold:
        return "grayscale"
    return None
