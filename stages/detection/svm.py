"""Per-class linear SVMs on CNN features, trained with hard negative mining (R-CNN §2.3, App. B).

Conventions (REFERENCE §1 "SVMs"; R-CNN ``rcnn_train.m``):

* positives: the ground-truth boxes of the class (`positive_mask`); negatives: proposals whose max
  IoU with every gt of the class is ``< 0.3`` (`negative_mask`); boxes in between are ignored.
* features are already scaled to mean L2 norm 20 (`stages.detection.features.feature_norm_scale`),
  which is what the paper's ``C = 0.001`` assumes.
* liblinear ``-s 3 -c 0.001 -w1 2 -B 10``: L2-regularised hinge loss solved in the dual, positive
  class weight 2, and a constant bias feature of value 10 whose weight is regularised like any
  other. `sklearn.svm.LinearSVC` wraps the same liblinear solver; ``intercept_scaling`` *is* ``-B``
  and ``intercept_ = 10 * w_bias``, exactly R-CNN's ``b = llm.w(end) * bias_mult``.
* hard negative mining, one pass over the training images (*code*): the first image adds all its
  negatives and trains; every later image adds the negatives scoring ``> -1.0001`` under the current
  model that are not already cached; the class is retrained once ``> 2000`` negatives were added
  since the last training, and after the last image; each training is followed by evicting cached
  negatives scoring ``< -1.2``. Memory is bounded by the cache, not by the number of images.

Mining runs either through `HardNegativeSVM.fit_stream` or, to share one pass over the feature
cache between all classes as ``rcnn_train.m`` does, through ``start_mining`` → ``mine_image`` per
image → ``finish_mining`` on one estimator per class.

Rounds (parallel mining, issue 19). ``rcnn_train.m`` scores image ``i + 1`` with the model
retrained after image ``i``, so its pass is sequential. To mine many images at once, the images
are grouped into *rounds*: every image of a round is scored with the models as they stood when the
round began (`MiningModels` → `select_hard_negatives`, which can run anywhere), and a class may
retrain at the end of a round only (``mine_image(..., end_of_round=...)``, ``add_negatives``).
That is exactly the code's schedule with each retrain delayed to the end of the round in which its
``> 2000`` threshold was crossed; the first training follows the first round. With one image per
round the two are identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.svm import LinearSVC


def positive_mask(gt_class: np.ndarray, is_gt: np.ndarray, class_index: int) -> np.ndarray:
    """``(N,)`` bool: ground-truth rows of class ``class_index``.

    Difficult objects count: R-CNN's positives are every gt of the class (``d.class == j`` in
    ``get_positive_pool5_features``), and its roidb keeps difficult objects.
    """
    return np.asarray(is_gt, dtype=bool) & (np.asarray(gt_class) == class_index)


def negative_mask(
    max_iou_for_class: np.ndarray,
    is_gt: np.ndarray,
    neg_iou: float = 0.3,
    include_gt: bool = False,
) -> np.ndarray:
    """``(N,)`` bool: proposals whose max IoU with the class's gt is strictly below ``neg_iou``.

    ``neg_iou = 0.3`` was picked by grid search (§2.3: 0.5 costs 5 mAP, 0 costs 4). R-CNN's
    ``sample_negative_features`` tests only the overlap, so gt boxes of *other* classes (overlap
    < 0.3 with this one) are negatives there too; ``include_gt=True`` reproduces that.
    The grid's end point ``neg_iou = 0`` means regions that overlap no gt box at all (IoU = 0):
    "strictly below 0" would leave no negatives.
    """
    iou = np.asarray(max_iou_for_class)
    mask = iou < neg_iou if neg_iou > 0 else iou <= 0
    return mask if include_gt else mask & ~np.asarray(is_gt, dtype=bool)


def svm_scores(X: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """Scores ``(n,)`` float64 of ``X (n, D)`` under one linear SVM: the product runs in float32, as
    R-CNN scores with single-precision ``W`` (half the memory traffic of float64 on a 2000 × 4096
    image), and every scorer of mining goes through here so that all pick the same negatives."""
    X = np.asarray(X, dtype=np.float32)
    return (X @ np.asarray(coef, dtype=np.float32)).astype(np.float64) + intercept


@dataclass(frozen=True)
class MiningModels:
    """What scoring needs of every class's miner, without the caches: ``coef (C, D)`` float32,
    ``intercept (C,)`` float64, ``take_all (C,)`` bool (mode "all", or not trained yet: every
    negative is kept), ``add_threshold``. Small enough to send to every mining task."""

    coef: np.ndarray
    intercept: np.ndarray
    take_all: np.ndarray
    add_threshold: float

    @classmethod
    def of(cls, miners: list[HardNegativeSVM]) -> MiningModels:
        if not miners:
            raise ValueError("MiningModels.of needs at least one miner")
        return cls(
            coef=np.stack([m.coef_.astype(np.float32) for m in miners]),
            intercept=np.array([m.intercept_ for m in miners], np.float64),
            take_all=np.array([m.takes_all for m in miners]),
            add_threshold=float(miners[0].add_threshold),
        )


def select_hard_negatives(models: MiningModels, k: int, X: np.ndarray) -> np.ndarray:
    """Row indices of ``X (n, D)`` that miner ``k`` of ``models`` would add: all of them before its
    first training (and in mode "all"), else those scoring ``> add_threshold``."""
    if models.take_all[k]:
        return np.arange(len(X))
    return np.flatnonzero(svm_scores(X, models.coef[k], models.intercept[k]) > models.add_threshold)


def _as_keys(keys, n: int) -> list:
    """Hashable per-row keys: ``(n,)`` scalars or ``(n, k)`` rows (kept as tuples)."""
    arr = np.asarray(keys)
    if len(arr) != n or arr.ndim not in (1, 2):
        raise ValueError(f"keys must be (n,) or (n, k) with n={n} rows, got shape {arr.shape}")
    out = [tuple(k) for k in arr.tolist()] if arr.ndim == 2 else arr.tolist()
    if len(set(out)) != n:
        raise ValueError("keys repeat within one image; each negative needs its own key")
    return out


class HardNegativeSVM(BaseEstimator):
    """One class's linear SVM ``score = coef_ · x + intercept_``, trained by hard negative mining.

    Parameters are R-CNN's (``rcnn_train.m``): ``C`` (``svm_C``), ``pos_weight``
    (``pos_loss_weight``, liblinear ``-w1``), ``bias_value`` (``bias_mult``, liblinear ``-B``),
    ``retrain_after`` (``retrain_limit``), ``add_threshold`` (``hard_thresh``), ``evict_threshold``
    (``evict_thresh``). ``tol = 0.1`` is liblinear's default stopping tolerance for ``-s 3``,
    which R-CNN never overrides (sklearn's own default is 1e-4). ``mode="all"`` trains once on
    every negative — the baseline that mining approximates.

    Learned attributes: ``coef_ (D,)``, ``intercept_`` float, ``n_negatives_cache_`` and
    ``negative_keys_`` (the cache after the final eviction), ``history_``: one dict per training
    with ``image_index`` (0-based image after which it ran), ``n_neg_cache`` (negatives trained
    on), ``n_added`` (since the previous training), ``n_evicted``, ``objective`` = ``pos_loss +
    neg_loss + reg_loss`` as R-CNN logs it, and ``train_s``.
    """

    def __init__(
        self,
        C: float = 0.001,  # §2.3/App. B, for features of mean norm 20
        pos_weight: float = 2.0,  # positives' hinge loss counts twice (code)
        bias_value: float = 10.0,  # constant bias feature (code)
        retrain_after: int = 2000,  # retrain once > 2000 new negatives (code)
        add_threshold: float = -1.0001,  # add margin violators: score > -1.0001 (code)
        evict_threshold: float = -1.2,  # evict easy negatives: score < -1.2 (code)
        max_iter: int = 10000,
        mode: str = "hnm",  # "hnm" | "all"
        tol: float = 0.1,  # liblinear's default eps for -s 3 (R-CNN passes no -e)
    ):
        self.C = C
        self.pos_weight = pos_weight
        self.bias_value = bias_value
        self.retrain_after = retrain_after
        self.add_threshold = add_threshold
        self.evict_threshold = evict_threshold
        self.max_iter = max_iter
        self.mode = mode
        self.tol = tol

    # -- streaming API ----------------------------------------------------------------------------

    def fit_stream(
        self, positives: np.ndarray, negative_batches: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> HardNegativeSVM:
        """Train on ``positives (P, D)`` and one ``(keys (n,), negatives (n, D))`` pair per image.

        ``keys`` identify rows across the stream so a negative is never cached twice — e.g.
        ``image_index * 2**16 + box_index`` or ``(n, 2)`` rows of ``(image_index, box_index)``,
        like R-CNN's ``keys_neg``. ``negatives`` are already filtered by `negative_mask` and
        scaled. Images are visited once, in order.
        """
        self.start_mining(positives)
        for keys, negatives in negative_batches:
            self.mine_image(keys, negatives)
        return self.finish_mining()

    def start_mining(self, positives: np.ndarray) -> HardNegativeSVM:
        """Reset the model to ``w = 0, b = 0`` with ``positives (P, D)`` and an empty cache."""
        if self.mode not in ("hnm", "all"):
            raise ValueError(f"mode must be 'hnm' or 'all', got {self.mode!r}")
        pos = np.asarray(positives, dtype=np.float32)
        if pos.ndim != 2 or len(pos) == 0:
            raise ValueError(f"positives must be a non-empty (P, D) array, got {pos.shape}")
        self._positives = pos
        self._cache_X = [np.zeros((0, pos.shape[1]), np.float32)]  # chunks, joined on retrain
        self._cache_keys: list = []
        self._cache_key_set: set = set()
        self._n_added = 0
        self._n_images = 0
        self._n_rounds = 0
        self._trained_on_last_image = False
        # Until the first training every score is 0 > -1.0001, so an image before it (possible
        # only if the first image had no negatives) contributes all its negatives.
        self.coef_ = np.zeros(pos.shape[1])
        self.intercept_ = 0.0
        self.history_: list[dict] = []
        return self

    @property
    def takes_all(self) -> bool:
        """Every offered negative is added: mode "all", or no training yet (R-CNN's first image
        adds all its negatives; until a first training every score is 0 > -1.0001 anyway)."""
        return self.mode == "all" or not self.history_

    def mine_image(self, keys, negatives: np.ndarray, *, end_of_round: bool = True):
        """Offer one image's ``negatives (n, D)`` with their ``keys``: the hard ones under the
        current model are added; may retrain at the end of a round (see module)."""
        X = self._check(negatives)
        _as_keys(keys, len(X))  # shape and repeats checked before any selection
        keys = np.asarray(keys)
        picked = select_hard_negatives(MiningModels.of([self]), 0, X)
        return self.add_negatives(keys[picked], X[picked], end_of_round=end_of_round)

    def add_negatives(self, keys, negatives: np.ndarray, *, end_of_round: bool = True):
        """Add one image's already selected negatives (`select_hard_negatives`, e.g. in a remote
        task) that are not cached yet; at the end of a round, retrain if this is the first round
        or ``> retrain_after`` negatives were added since the last training."""
        X = self._check(negatives)
        keys = _as_keys(keys, len(X))
        new = [i for i, k in enumerate(keys) if k not in self._cache_key_set]  # no duplicates
        self._add_to_cache([keys[i] for i in new], X[new])
        self._n_added += len(new)
        retrain = end_of_round and self.mode == "hnm" and len(self._cache_keys) > 0
        retrain = retrain and (self._n_rounds == 0 or self._n_added > self.retrain_after)
        if retrain:
            self._retrain(self._n_images)
        self._trained_on_last_image = retrain
        self._n_images += 1
        self._n_rounds += end_of_round
        return self

    def _check(self, negatives: np.ndarray) -> np.ndarray:
        X = np.asarray(negatives, dtype=np.float32)  # R-CNN keeps features in single precision
        if X.ndim != 2 or X.shape[1] != self._positives.shape[1]:
            raise ValueError(f"negatives must be (n, {self._positives.shape[1]}), got {X.shape}")
        return X

    def finish_mining(self) -> HardNegativeSVM:
        """Final training (R-CNN retrains after the last image); frees the cached features."""
        if not self._cache_keys:
            raise ValueError(f"no negatives in {self._n_images} image(s); cannot train an SVM")
        if not self._trained_on_last_image:
            self._retrain(self._n_images - 1)
        self.n_negatives_cache_ = len(self._cache_keys)
        self.negative_keys_ = np.asarray(self._cache_keys)
        del self._cache_X, self._cache_keys, self._cache_key_set, self._positives
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Scores ``(n,)`` float64 of features ``X (n, D)``: ``X · coef_ + intercept_``.

        The product runs in float32, as R-CNN scores with single-precision ``W`` — half the
        memory traffic of float64 on a 2000 × 4096 image.
        """
        if not hasattr(self, "coef_"):
            raise NotFittedError("call fit_stream (or start_mining) before decision_function")
        return svm_scores(X, self.coef_, self.intercept_)

    # -- internals (overridden by tests to instrument mining) -------------------------------------

    def _add_to_cache(self, keys: list, X: np.ndarray) -> None:
        self._cache_X.append(X)
        self._cache_keys.extend(keys)
        self._cache_key_set.update(keys)

    def _solve(self, X_pos: np.ndarray, X_neg: np.ndarray) -> tuple[np.ndarray, float]:
        """liblinear ``-s 3 -c C -w1 pos_weight -B bias_value`` on ``(P, D)`` vs ``(M, D)``.

        Peak memory is a few copies of the cache: sklearn converts to float64 and liblinear to
        its sparse nodes (16 bytes per non-zero), ~100 KB per dense 4096-d row in all.
        """
        svc = LinearSVC(
            C=self.C,
            loss="hinge",  # L1 (hinge) loss, dual coordinate descent: liblinear -s 3
            dual=True,
            class_weight={1: self.pos_weight, -1: 1.0},  # -w1: C_pos = pos_weight * C
            fit_intercept=True,
            intercept_scaling=self.bias_value,  # the -B bias feature; intercept_ = B * w_bias
            tol=self.tol,
            max_iter=self.max_iter,
            random_state=0,  # liblinear shuffles coordinates each sweep
        )
        y = np.r_[np.ones(len(X_pos)), -np.ones(len(X_neg))]
        svc.fit(np.concatenate([X_pos, X_neg]), y)
        return svc.coef_[0].copy(), float(svc.intercept_[0])

    def _retrain(self, image_index: int) -> None:
        X_neg = np.concatenate(self._cache_X)  # (M, D)
        n_added, self._n_added = self._n_added, 0
        start = time.perf_counter()
        self.coef_, self.intercept_ = self._solve(self._positives, X_neg)
        train_s = time.perf_counter() - start
        z_pos, z_neg = self.decision_function(self._positives), self.decision_function(X_neg)
        # The objective R-CNN logs after each update (rcnn_train.m), before eviction.
        pos_loss = self.C * self.pos_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
        neg_loss = self.C * float(np.maximum(0.0, 1.0 + z_neg).sum())
        reg_loss = (
            0.5 * float(self.coef_ @ self.coef_) + 0.5 * (self.intercept_ / self.bias_value) ** 2
        )
        keep = z_neg >= self.evict_threshold if self.mode == "hnm" else np.ones(len(X_neg), bool)
        if not keep.all():
            self._cache_X = [X_neg[keep]]
            evicted = [k for k, kept in zip(self._cache_keys, keep, strict=True) if not kept]
            self._cache_keys = [k for k, kept in zip(self._cache_keys, keep, strict=True) if kept]
            self._cache_key_set.difference_update(evicted)
        else:
            self._cache_X = [X_neg]
        self.history_.append(
            {
                "image_index": image_index,
                "n_neg_cache": len(X_neg),
                "n_added": n_added,
                "n_evicted": int((~keep).sum()),
                "objective": pos_loss + neg_loss + reg_loss,
                "pos_loss": pos_loss,
                "neg_loss": neg_loss,
                "reg_loss": reg_loss,
                "train_s": train_s,
            }
        )
