"""The batchnorm step list: ``steps(cfg)`` turns the config into steps (names, adaptors, params
that enter the keys, resources)."""

from __future__ import annotations

from cluster.resources import Resources
from pipelines.batchnorm.config import (
    BatchNormConfig,
    require_data,
)
from pipelines.batchnorm.data import make_cifar, make_mnist
from pipelines.batchnorm.experiments import (
    run_batch_size,
    run_mnist,
    run_multi_worker,
    run_variants,
)
from pipelines.engine import Step


def steps(cfg: BatchNormConfig) -> list[Step]:
    from pipelines.batchnorm.report import write_report

    d, m, v, b, w = cfg.data, cfg.mnist, cfg.variants, cfg.batch_size, cfg.multi_worker
    require_data(cfg)  # exit 2 naming data.root / data.cifar_root before anything runs
    # two trials at once on 2 cores; resources are not in the keys (results don't depend on them)
    trial = Resources(cpus=1, gpus="auto" if cfg.gpus == "auto" else 0)
    # fields that don't change a dataset's bytes stay out of its key
    mnist_data = dict(
        root=d.root, digits_test=0 if d.root else d.digits_test, seed=0 if d.root else d.seed
    )
    cifar_data = dict(
        root=d.cifar_root,
        n_train=0 if d.cifar_root else d.cifar_train,
        n_test=0 if d.cifar_root else d.cifar_test,
        seed=0 if d.cifar_root else d.seed,
    )
    mlp = dict(init_std=m.init_std, hidden=m.hidden)
    out = [
        Step(
            "mnist_data",
            make_mnist,
            params=mnist_data,
            description="MNIST IDX or digits → mnist.npz",
        )
    ]
    experiments = []
    if m.enabled:
        params = {f: getattr(m, f) for f in _MNIST_FIELDS}
        out.append(
            Step(
                "mnist",
                run_mnist,
                kind="sweep",
                inputs=("mnist_data",),
                params=params,
                resources=trial,
                trials=2 * len(m.seeds),
                description="§4.1 / Fig. 1: sigmoid MLP with vs without BN",
            )
        )
        experiments.append("mnist")
    if v.enabled:
        out.append(Step("cifar_data", make_cifar, params=cifar_data, description="CIFAR-10 binary"))
        out.append(
            Step(
                "variants",
                run_variants,
                kind="sweep",
                inputs=("cifar_data",),
                params={f: getattr(v, f) for f in _VARIANT_FIELDS},
                # 2: He-initialised convolutions; 3: all 11 modules of the small Inception;
                # 4: §4.2.1's shuffling and photometric changes
                version="4",
                resources=trial,
                trials=len(v.variants) * len(v.seeds),
                description="§4.2 / Figs. 2-3: BN variants on a small Inception-style net",
            )
        )
        experiments.append("variants")
    if b.enabled:
        out.append(
            Step(
                "batch_size",
                run_batch_size,
                kind="sweep",
                inputs=("mnist_data",),
                params=dict(
                    sizes=b.sizes,
                    seeds=b.seeds,
                    budget=b.budget,
                    ref_batch=m.batch_size,
                    steps=b.steps,
                    lr=b.lr,
                    eval_every=b.eval_every,
                    bn_kind=m.bn_kind,
                    **mlp,
                ),
                resources=trial,
                trials=len(b.sizes) * 2 * len(b.seeds),
                version="2",  # batch-statistics accuracy: every test batch has exactly m examples
                description="BN vs no BN across minibatch sizes; train vs inference mode",
            )
        )
        experiments.append("batch_size")
    if w.enabled:
        out.append(
            Step(
                "multi_worker",
                run_multi_worker,
                kind="train",
                inputs=("mnist_data",),
                params=dict(
                    num_workers=w.num_workers,
                    per_worker_batch=w.per_worker_batch,
                    steps=w.steps,
                    lr=w.lr,
                    eval_every=w.eval_every,
                    seed=w.seed,
                    **mlp,
                ),
                resources=trial,  # per worker
                description="Ray Train DDP: per-worker vs synchronised BN statistics",
            )
        )
        experiments.append("multi_worker")
    out.append(
        Step(
            "report",
            write_report,
            inputs=(*experiments, "mnist_data", *(("cifar_data",) if v.enabled else ())),
            params=dict(experiments=tuple(experiments), variants_max_test=v.max_test),
            # 4: first line names toy data; per-seed targets and drift (issue 20); 5: claims;
            # 6: Figure 2's target line in its legend (issue 22)
            version="6",
            publish=REPORT_FILES,
            description="metrics.json, curves.parquet, report.md with Figures 1-3",
        )
    )
    return out


_MNIST_FIELDS = (
    "steps", "batch_size", "optimizer", "lr", "init_std", "hidden", "eval_every", "probe_size",
    "probe_unit", "seeds", "bn_kind", "population_batches",
)  # fmt: skip
_VARIANT_FIELDS = (
    "variants", "seeds", "steps", "batch_size", "lr", "momentum", "weight_decay", "dropout", "lrn",
    "lr_decay_rate", "lr_decay_steps", "width", "image_px", "eval_every", "max_train", "max_test",
    "shuffle", "distortion", "distortion_reduction",
)  # fmt: skip
REPORT_FILES = (
    "report.md", "metrics.json", "curves.parquet", "figure1.png", "figure2.png", "batch_size.png",
    "claims.json",
)  # fmt: skip
