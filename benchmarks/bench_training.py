"""Training throughput of the pipelines' loops against a plain PyTorch loop on the same model, data,
batch size and threads, measured side by side in one run (issue 9 item 7: goal >= 0.9, "the engine
adds nothing").

1. ``stages/training/classify.train_classifier`` (the MobileNetV2 pipeline's loop; MobileNetV2 0.35
   at 32 px with the CIFAR-style stem, as in the CPU presets), in-process, vs a plain loop
   (DataLoader, SGD with momentum, cross-entropy, backward, step). Augmentation is off in both; our
   loop also evaluates 256 test images per epoch and keeps its running statistics, as it does in
   the pipeline.
2. The same loop as a Ray Train run (TorchTrainer, one worker holding every CPU, through the
   executor the pipelines use): steady-state images/s from the difference between an (E+1)-epoch
   and a 1-epoch run, and the fixed cost of starting the worker group.
3. ``stages/training/bn_experiments.train_classifier`` (Batch Normalization's MNIST MLP: 3 × 100
   sigmoid units with BN, minibatch 60) vs a plain loop over the same minibatches.

    python benchmarks/bench_training.py [--epochs 5] [--images 2048] [--no-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from data.synthetic_cifar import generate_cifar10
from stages.models.registry import create
from stages.training import bn_experiments, classify
from stages.training.context import LocalTrainContext

MODEL = {"model": "mobilenetv2", "model_kwargs": {"width_mult": 0.35, "stem_stride": 1}}


def best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def classify_config(root: str, images: int, epochs: int) -> dict:
    return {
        **MODEL,
        "dataset_root": root,
        "max_train": images,
        "max_test": 256,
        "augment": False,
        "epochs": epochs,
        "batch_size": 128,
        "lr": 0.05,
        "schedule": "cosine",
    }


def plain_classify(root: str, images: int, epochs: int) -> None:
    x, y = classify.load_split(root, "train", 32, images)
    torch.manual_seed(0)
    model = create(MODEL["model"], num_classes=10, **MODEL["model_kwargs"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True, drop_last=True
    )
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def ray_classify(root: str, images: int, epochs: int, storage: str) -> float:
    from cluster.ray_executor import RayExecutor
    from cluster.resources import Resources

    cpus = float(torch.get_num_threads())
    t0 = time.perf_counter()
    RayExecutor(progress=False).train(
        classify.train_classifier,
        classify_config(root, images, epochs),
        num_workers=1,
        resources_per_worker=Resources(cpus=cpus),
        storage_path=storage,
        name=f"bench-{epochs}-{time.time_ns()}",
    )
    return time.perf_counter() - t0


def bn_pair(steps: int) -> tuple[float, float]:
    from stages.models.bn_nets import MnistMLP

    g = torch.Generator().manual_seed(0)
    train = bn_experiments.Arrays(
        torch.randn(6000, 784, generator=g), torch.randint(0, 10, (6000,))
    )
    test = bn_experiments.Arrays(train.x[:500], train.y[:500])

    def ours():
        torch.manual_seed(0)
        model = MnistMLP(bn=True, hidden=(100, 100, 100), init_std=0.1, bn_kind="ours")
        bn_experiments.train_classifier(
            model, train, test, steps=steps, batch_size=60, lr=0.5, eval_every=steps
        )

    def plain():
        torch.manual_seed(0)
        model = MnistMLP(bn=True, hidden=(100, 100, 100), init_std=0.1, bn_kind="ours")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        perm = torch.randperm(6000)
        model.train()
        for step in range(steps):
            idx = perm[(step * 60) % 5940 :][:60]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    ours(), plain()  # warm-up
    return best_of(ours, 3), best_of(plain, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)  # 2 left the estimate to start-up noise
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--bn-steps", type=int, default=1000)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    e, n = args.epochs, args.images
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        root = str(generate_cifar10(f"{d}/cifar", n_train=n, n_test=256))
        cfg = classify_config(root, n, e)
        plain_classify(root, n, 1)  # warm-up: allocator, oneDNN primitives
        t_ours = best_of(lambda: classify.train_classifier(LocalTrainContext(), cfg))
        t_plain = best_of(lambda: plain_classify(root, n, e))
        ours, plain = e * n / t_ours, e * n / t_plain
        print(
            f"classify.train_classifier, MobileNetV2 0.35 @ 32 px, batch 128, {threads} threads: "
            f"{ours:.0f} images/s vs plain loop {plain:.0f} images/s = {ours / plain:.2f} "
            "(goal >= 0.9)"
        )
        if not args.no_ray:
            from cluster import runtime

            runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")
            ray_classify(root, n, 1, f"{d}/ray")  # warm-up: worker processes, imports
            t1 = ray_classify(root, n, 1, f"{d}/ray")
            t_more = ray_classify(root, n, e + 1, f"{d}/ray")
            steady = e * n / (t_more - t1)
            start = t1 - n / steady
            print(
                f"  the same under Ray Train (1 worker, {threads} CPUs): {steady:.0f} images/s "
                f"steady = {steady / plain:.2f} of the plain loop; start-up {start:.1f} s per run"
            )
        t_ours, t_plain = bn_pair(args.bn_steps)
        print(
            f"bn_experiments.train_classifier, BN MLP 3x100 sigmoid, batch 60: "
            f"{args.bn_steps / t_ours:.0f} steps/s vs plain loop {args.bn_steps / t_plain:.0f} "
            f"steps/s = {t_plain / t_ours:.2f} (goal >= 0.9)"
        )


if __name__ == "__main__":
    main()
