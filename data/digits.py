"""scikit-learn's bundled handwritten digits (UCI optdigits test set): a real, small, offline
classification set used where MNIST would need a download."""

from __future__ import annotations

import cv2
import numpy as np
import sklearn.datasets


def load_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images ``uint8 (1797, size, size)`` in 0..255, labels ``int64 (1797,)``.

    The 8x8 originals count "on" pixels in 4x4 blocks (0..16); they are scaled to 0..255 and
    resized with ``cv2.INTER_LINEAR`` (``size=28`` matches MNIST models).
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    bunch = sklearn.datasets.load_digits()
    small = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    images = np.stack(
        [cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR) for img in small]
    )
    return images, bunch.target.astype(np.int64)
