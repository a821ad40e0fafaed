"""No silent toy fallback (issue 20): every preset named after a paper, and every `real` preset,
refuses to start without its real data — exit 2 naming the key (and, for Fashion-MNIST, how to get
it), before Ray starts and before anything is written."""

from __future__ import annotations

import pytest

from data.fashion_mnist import DEFAULT_ROOT, missing_files, problem
from data.mnist import write_idx
from pipelines import cli, registry
from pipelines.config import remote_data_paths


@pytest.fixture
def no_ray(monkeypatch):
    from cluster import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start without the data")

    monkeypatch.setattr(runtime, "connect", refuse)


def run_cli(capsys, tmp_path, pipeline, preset, *sets):
    argv = ["run", pipeline, "--preset", preset, "--store", str(tmp_path / "s")]
    argv += ["--out", str(tmp_path / "r")]
    for s in sets:
        argv += ["--set", s]
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("pipeline", "preset", "sets", "message"),
    [
        ("rcnn", "voc2007", (), "data.root is not set: data.source=voc reads a VOC-format"),
        ("batchnorm", "paper", (), "data.root is not set: §4.1 trains on real MNIST-format IDX"),
        ("batchnorm", "paper", (f"data.root={DEFAULT_ROOT}",), "data.cifar_root is not set"),
        ("generalization", "paper", (), "data.root is not set: the cifar10 source reads CIFAR-10"),
        ("generalization", "paper", ("experiments=min_norm",), "min_norm.root is not set"),
        ("mobilenet", "paper", (), "data.root is not set and data.num_train/num_test are 0"),
        ("ssl", "paper", (), "data.root is not set: data.source=cifar10 reads CIFAR-10 binary"),
    ],
)
def test_paper_presets_refuse_without_their_data(
    capsys, tmp_path, no_ray, pipeline, preset, sets, message
):
    if f"data.root={DEFAULT_ROOT}" in sets and problem(DEFAULT_ROOT):
        pytest.skip(f"Fashion-MNIST is not installed in {DEFAULT_ROOT} (`make data`)")
    code, err = run_cli(capsys, tmp_path, pipeline, preset, *sets)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("pipeline", ["batchnorm", "generalization", "mobilenet", "ssl"])
def test_real_presets_without_fashion_mnist_exit_2_with_the_hint(
    capsys, tmp_path, no_ray, pipeline
):
    empty = tmp_path / "empty"
    empty.mkdir()
    sets = [f"data.root={empty}"]
    if pipeline == "generalization":
        sets.append(f"min_norm.root={empty}")
    code, err = run_cli(capsys, tmp_path, pipeline, "real", *sets)
    assert code == 2, err
    assert f"data.root: {empty} lacks train-images-idx3-ubyte" in err
    assert "run `make data`" in err and "dataset-fashion-mnist" in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_the_real_presets_read_fashion_mnist_from_the_debian_path():
    for name in ("batchnorm", "generalization", "mobilenet", "ssl"):
        spec = registry.get(name)
        cfg = spec.build_config("real", {"data.root": "/elsewhere"})
        assert cfg.data.root == "/elsewhere"  # data.root overrides the default
        assert (
            spec.presets["real"]["data.root"] == DEFAULT_ROOT == "/usr/share/datasets/fashion-mnist"
        )


def test_idx_files_plain_or_gzipped_count_and_submit_checks_keys_only(tmp_path):
    import numpy as np

    assert missing_files(tmp_path / "nowhere") == list(missing_files(tmp_path))  # all four
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    assert missing_files(tmp_path) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    spec = registry.get("batchnorm")
    cfg = spec.build_config("real", {"data.root": str(tmp_path / "on-the-cluster")})
    with remote_data_paths():  # `paperline submit`: the cluster's nodes hold the data
        assert [s.name for s in spec.steps(cfg)][:2] == ["mnist_data", "mnist"]
