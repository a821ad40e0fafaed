"""SSL training survives a lost worker under Ray Train (issue 19): ``max_failures=1`` restarts the
worker group, which resumes the run from its last mid-run checkpoint and ends where an
uninterrupted in-process run ends. (The in-process resume is tested bit for bit, state by state,
in ``tests/stages/test_fixmatch.py``.)"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.resources import Resources, pinned_threads
from data.digits import load_digits
from stages.ssl.train import TrainSettings, ssl_train_fn
from stages.training.context import LocalTrainContext

SETTINGS = TrainSettings(
    method="learned",
    model="ssl_convnet",
    steps=7,
    batch_size=8,
    mu=2,
    threshold=0.0,  # every pseudo-label counts: λ moves at every outer step
    ema_decay=0.9,
    inner_steps=2,
    outer_lr=0.5,
    eval_every=1,
    last_k=2,
    flip=False,
)


def _config(tmp_path: Path) -> dict:
    images, labels = load_digits(16)
    perm = np.random.default_rng(0).permutation(len(labels))
    tr, te = perm[:300], perm[300:400]
    np.savez(tmp_path / "data.npz", train_images=images[tr, None], train_labels=labels[tr],
             test_images=images[te, None], test_labels=labels[te])  # fmt: skip
    return {
        "settings": dataclasses.asdict(SETTINGS),
        "runs": [{"labels_per_class": 2, "seed": 0}],
        "val_per_class": 3,
        "checkpoint_every": 3,
        "data_path": str(tmp_path / "data.npz"),
    }


def _dies_once(marker: str, at_forward: int):
    """A training function whose worker process exits in its ``at_forward``-th training step,
    on the first attempt only (``marker`` records that it happened)."""

    def train_fn(ctx, config):
        if not os.path.exists(marker):
            prepare, forwards = ctx.prepare_model, [0]

            class Dying(torch.nn.Module):
                def __init__(self, net):
                    super().__init__()
                    self.module = net

                def forward(self, x):
                    forwards[0] += 1
                    if forwards[0] == at_forward:
                        open(marker, "w").close()
                        os._exit(1)  # the worker process is gone, mid-step
                    return self.module(x)

            ctx.prepare_model = lambda m: Dying(prepare(m))
        ssl_train_fn(ctx, config)

    return train_fn


@pytest.mark.ray
def test_ray_train_resumes_an_ssl_run_after_its_worker_dies(ray_executor, tmp_path):
    config = _config(tmp_path)
    marker = str(tmp_path / "died")
    result = ray_executor.train(
        _dies_once(marker, at_forward=5),  # in step 5, after the checkpoint at step 3
        config,
        num_workers=1,
        resources_per_worker=Resources(cpus=1),
        storage_path=str(tmp_path / "work"),
        name="ssl-resume",
        max_failures=1,
    )
    assert os.path.exists(marker)  # the first attempt did die
    # one checkpoint at step 3 (the first attempt's), then the second attempt's from step 6 on;
    # an attempt restarted from scratch would have reported step 3 again
    steps = [h["run_step"] for h in result.history]
    assert steps[:2] == [3, 6] and np.isnan(steps[2]) and len(steps) == 3
    assert result.history[-1]["runs_done"] == 1
    whole = LocalTrainContext()
    with pinned_threads(1):  # the Ray worker's threads
        ssl_train_fn(whole, config)
    want, got = whole.last_checkpoint["results"][0], result.checkpoint["results"][0]
    assert got["curve"] == want["curve"] and got["accuracy"] == want["accuracy"]
    assert torch.equal(
        got["lambda_snapshots"][-1]["weights"], want["lambda_snapshots"][-1]["weights"]
    )
    assert (got["lambda_snapshots"][-1]["weights"] != 1).any()  # λ did move
