"""Zhang et al. 2017, "Understanding deep learning requires rethinking generalization": the
randomization tests (§2), Theorem 1's finite-sample construction (§4) and minimum-norm kernel
interpolation (§5), as plain numpy/scipy functions."""
