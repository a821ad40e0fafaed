"""The randomization tests of Zhang et al. 2017 §2: corrupted labels and corrupted inputs.

Every function takes an explicit seed and returns new arrays, so a pipeline draws each corruption
once and saves it: every trial and every epoch then sees the same noise (§2: "the labels are
randomized once, before training"). Images are ``(N, H, W, C)`` arrays; a *pixel* is one spatial
position with all its channels, so permutations move RGB triples together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# §2's conditions, in the order of Figure 1a. "corrupt" is the partial-label family of Fig. 1b/1c.
CONDITIONS = ("true_labels", "random_labels", "shuffled_pixels", "random_pixels", "gaussian")


def _rng(seed: int | tuple[int, ...]) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, tuple) else seed)


def corrupt_labels(
    labels: np.ndarray, p: float, num_classes: int, seed: int | tuple[int, ...]
) -> np.ndarray:
    """Each label independently, with probability ``p``, replaced by a uniform random class (§2).

    The replacement may equal the true class, so the expected fraction of labels that actually
    change is ``p * (1 - 1/num_classes)``; ``p = 1`` gives completely random labels.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = _rng(seed)
    out = np.array(labels, dtype=np.int64, copy=True)
    redraw = rng.random(len(out)) < p  # (N,)
    out[redraw] = rng.integers(0, num_classes, size=int(redraw.sum()))
    return out


def random_labels(labels: np.ndarray, num_classes: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """All labels replaced by uniform random classes (corruption with p = 1)."""
    return corrupt_labels(labels, 1.0, num_classes, seed)


def pixel_permutation(height: int, width: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """One permutation of the ``height * width`` pixel positions."""
    return _rng(seed).permutation(height * width)


def shuffle_pixels(images: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Apply one fixed pixel permutation to every image (§2 "shuffled pixels": the same permutation
    for the training *and* the test set, so the task stays learnable in principle)."""
    n, h, w, c = images.shape
    flat = images.reshape(n, h * w, c)
    return flat[:, permutation].reshape(n, h, w, c)


def random_pixels(images: np.ndarray, seed: int | tuple[int, ...]) -> np.ndarray:
    """A different random pixel permutation for every image (§2 "random pixels")."""
    n, h, w, c = images.shape
    rng = _rng(seed)
    perms = np.argsort(rng.random((n, h * w)), axis=1)  # (N, H*W): one permutation per row
    flat = images.reshape(n, h * w, c)
    return np.take_along_axis(flat, perms[:, :, None], axis=1).reshape(n, h, w, c)


def gaussian_images(
    shape: tuple[int, ...], mean: np.ndarray, std: np.ndarray, seed: int | tuple[int, ...]
) -> np.ndarray:
    """float32 images of ``shape`` (N, H, W, C) drawn from a Gaussian with per-channel ``mean``
    and ``std`` (§2 "Gaussian": matching mean and variance to the original dataset)."""
    rng = _rng(seed)
    noise = rng.standard_normal(shape, dtype=np.float32)
    return noise * np.asarray(std, np.float32) + np.asarray(mean, np.float32)


def channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a ``(N, H, W, C)`` set, float64 ``(C,)`` each."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return x.mean(axis=0), x.std(axis=0)


def randomize(
    condition: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    p: float = 0.0,
) -> dict[str, np.ndarray]:
    """The arrays a trial trains and tests on under ``condition``.

    Returns ``{"train_x", "train_y", "test_x", "test_y"}``; keys whose arrays are unchanged are
    left out (the caller keeps one copy of the true images). Test labels are never corrupted: test
    error is measured against the truth (Fig. 1c). Input corruptions apply to the test images too
    (one shuffle for both; fresh noise per image), so test accuracy is near chance there.
    ``condition="corrupt"`` uses ``p``; every other condition ignores it.
    """
    # independent streams per condition and per array, all from one seed
    stream = {name: i for i, name in enumerate((*CONDITIONS, "corrupt"))}
    if condition not in stream:
        raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(stream)}")
    s = stream[condition]
    if condition == "true_labels":
        return {}
    if condition == "random_labels":
        return {"train_y": random_labels(train_y, num_classes, (seed, s, 0))}
    if condition == "corrupt":
        return {"train_y": corrupt_labels(train_y, p, num_classes, (seed, s, round(p * 1000)))}
    if condition == "shuffled_pixels":
        perm = pixel_permutation(train_x.shape[1], train_x.shape[2], (seed, s, 0))
        return {"train_x": shuffle_pixels(train_x, perm), "test_x": shuffle_pixels(test_x, perm)}
    if condition == "random_pixels":
        return {
            "train_x": random_pixels(train_x, (seed, s, 0)),
            "test_x": random_pixels(test_x, (seed, s, 1)),
        }
    mean, std = channel_moments(train_x)  # gaussian: moments of the training set
    return {
        "train_x": gaussian_images(train_x.shape, mean, std, (seed, s, 0)),
        "test_x": gaussian_images(test_x.shape, mean, std, (seed, s, 1)),
    }


# ----------------------------------------------------------------------------------------------
# Saved variants: one directory per (variant, seed) holding only the arrays that differ from the
# clean set, so a sweep's trials read the same draw from disk.
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def variant_dir_name(variant: str, seed: int) -> str:
    """``"random_labels"``, ``"corrupt:0.4"`` (label noise p) → a directory name."""
    return f"{variant.replace(':', '-p')}-s{seed}"


def save_variants(
    out_dir: str | Path,
    clean: dict[str, np.ndarray],
    variants: tuple[str, ...],
    seeds: tuple[int, ...],
    *,
    num_classes: int,
    base_seed: int = 0,
) -> list[dict]:
    """Draw every ``variant`` (a condition, or ``"corrupt:p"``) for every trial seed from the
    clean arrays and write the changed ones as ``.npy``. Returns one summary row per draw."""
    rows = []
    for seed in seeds:
        for variant in variants:
            condition, _, p = variant.partition(":")
            changed = randomize(
                condition, **clean, num_classes=num_classes, seed=hash_seed(base_seed, seed),
                p=float(p or 0.0),
            )  # fmt: skip
            d = Path(out_dir) / variant_dir_name(variant, seed)
            d.mkdir(parents=True, exist_ok=True)
            for name, arr in changed.items():
                np.save(d / f"{name}.npy", arr)
            y = changed.get("train_y", clean["train_y"])
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "changed_arrays": sorted(changed),
                    "labels_changed_frac": float(np.mean(y != clean["train_y"])),
                }
            )
    return rows


def hash_seed(base_seed: int, trial_seed: int) -> int:
    """One integer seed from the experiment's base seed and the trial seed."""
    return int(np.random.SeedSequence([base_seed, trial_seed]).generate_state(1)[0])


def load_variant(
    clean_dir: str | Path, variants_dir: str | Path, variant: str, seed: int
) -> dict[str, np.ndarray]:
    """The four arrays of a saved variant, falling back to the clean set for unchanged ones."""
    d = Path(variants_dir) / variant_dir_name(variant, seed)
    if not d.is_dir():
        raise FileNotFoundError(f"no saved variant {variant!r} for seed {seed} in {variants_dir}")
    return {
        name: np.load(
            d / f"{name}.npy" if (d / f"{name}.npy").exists() else Path(clean_dir) / f"{name}.npy"
        )
        for name in ARRAYS
    }
