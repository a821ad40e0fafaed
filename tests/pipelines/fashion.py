"""Shared by the real-data tests: whether Fashion-MNIST is installed where the `real` presets read
it (``make data``; ``.ci/run`` installs it), and the skip marker with the reason."""

from __future__ import annotations

import pytest

from data.fashion_mnist import DEFAULT_ROOT, problem

MISSING = problem(DEFAULT_ROOT)
needs_fashion_mnist = pytest.mark.skipif(
    MISSING is not None,
    reason=f"real-data test: Fashion-MNIST not installed ({MISSING}); run `make data`",
)
