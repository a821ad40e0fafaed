"""A cluster with no shared filesystem, run as a subprocess by ``test_multinode.py`` (issue 18).

``python -m tests.cluster.multinode_scenarios no_shared_fs WORKDIR`` starts an S3-compatible server
on loopback (moto's standalone server, reached through pyarrow's ``S3FileSystem``), a Ray head
with no CPUs and two worker nodes (``ray.cluster_utils.Cluster``), each node with its own
``PAPERLINE_CACHE_DIR`` — nothing but the object store is common to them. It runs `rcnn ci` end to
end (Train steps, map steps, the features step's Ray Data actors) and `batchnorm ci`'s Tune sweep
and 2-worker Train steps with the store on S3, then the same in-process into a local store, and
prints a JSON summary on its last line. Every process resolving an artifact (the driver, tasks,
actors, trials, Train workers: a ``worker_process_setup_hook``) logs where it found it and
whether it downloaded it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

RUNS = [
    ("rcnn", "ci", {}),
    # one Tune sweep step (mnist) and one 2-worker Ray Train step (multi_worker)
    ("batchnorm", "ci", {"variants.enabled": False, "batch_size.enabled": False}),
]


def _instrument() -> None:
    """Log every artifact this process resolves (node, this node's cache, the path) and every
    download it makes."""
    import ray

    from data import store

    trace = Path(os.environ["PAPERLINE_TEST_TRACE"])
    resolve, download = store.Artifact.local_dir, store.Artifact._download

    def log(artifact, **fields) -> None:
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        record = {"pid": os.getpid(), "node": node, "cache": str(store.node_cache_dir()),
                  "artifact": artifact.relpath, **fields}  # fmt: skip
        with open(trace / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def local_dir(self):
        path = resolve(self)
        log(self, path=str(path))
        return path

    def _download(self, *args):
        download(self, *args)
        log(self, downloaded=True)

    store.Artifact.local_dir, store.Artifact._download = local_dir, _download


# What a run records of its own wall-clock time (proposal seconds per image, training seconds):
# measurements, equal only by chance between two runs. Reports quote them.
TIMING_KEY = re.compile(r"(_s|_seconds|seconds_per_image|_per_s)$")


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not TIMING_KEY.search(k)}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _same_but_timing(a: Path, b: Path) -> bool:
    """Whether two files differ in timing measurements only (JSON keys, Parquet columns)."""
    import pyarrow.parquet as pq

    if a.suffix == ".json":
        return _without_timing(json.loads(a.read_text())) == _without_timing(
            json.loads(b.read_text())
        )
    if a.suffix == ".parquet":
        ta, tb = pq.read_table(a), pq.read_table(b)
        keep = [c for c in ta.column_names if not TIMING_KEY.search(c) and c != "seconds"]
        return ta.select(keep).equals(tb.select(keep)) if keep else True
    return False


def _markers(store) -> dict[str, dict[str, str]]:
    """``{artifact: {file: sha256}}`` of every complete artifact of ``store``."""
    return {
        a.relpath: {f: m["sha256"] for f, m in store.marker(a)["files"].items()}
        for a in store.artifacts()
    }


def no_shared_fs(workdir: Path) -> dict:
    import pyarrow.fs as pafs
    import ray
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    from data.store import ArtifactStore
    from pipelines import runner

    os.environ.update(AWS_ACCESS_KEY_ID="paperline", AWS_SECRET_ACCESS_KEY="paperline")
    os.environ.update(AWS_DEFAULT_REGION="us-east-1", PAPERLINE_SHIP_CODE="0")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
    s3.create_dir("paperline")
    uri = f"s3://paperline/store?endpoint_override={endpoint}&scheme=http"

    trace = workdir / "trace"
    trace.mkdir(parents=True)
    caches = {name: workdir / f"cache-{name}" for name in ("head", "a", "b")}
    os.environ["PAPERLINE_CACHE_DIR"] = str(caches["head"])  # the driver runs on the head
    os.environ["PAPERLINE_TEST_TRACE"] = str(trace)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "env_vars": {"PAPERLINE_CACHE_DIR": str(caches["head"])}},
    )
    node_cache = {cluster.head_node.node_id: str(caches["head"])}
    for name in ("a", "b"):
        node = cluster.add_node(
            num_cpus=2,
            object_store_memory=300 << 20,
            env_vars={"PAPERLINE_CACHE_DIR": str(caches[name])},
        )
        node_cache[node.node_id] = str(caches[name])
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "tests.cluster.multinode_scenarios._instrument"},
    )
    _instrument()
    remote = ArtifactStore(uri)
    metrics = {}
    for pipeline, preset, overrides in RUNS:
        result = runner.run(pipeline, preset, overrides, store=uri, runs=workdir / "runs",
                            executor="ray", progress=False, log=lambda _: None)  # fmt: skip
        metrics[pipeline] = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    on_s3 = _markers(remote)
    records = [json.loads(line) for p in trace.glob("*.jsonl") for line in p.open()]
    copies = {name: remote.artifact(*name.split("/")).local_dir() for name in on_s3}
    ray.shutdown()
    cluster.shutdown()
    server.stop()

    local = ArtifactStore(workdir / "ref-store")
    for pipeline, preset, overrides in RUNS:
        runner.run(pipeline, preset, overrides, store=str(local.uri), runs=workdir / "ref-runs",
                   executor="local", progress=False, log=lambda _: None)  # fmt: skip
    reference = _markers(local)
    differing = sorted(
        f"{a}/{f}"
        for a in set(on_s3) & set(reference)
        for f in set(on_s3[a]) | set(reference[a])
        if on_s3[a].get(f) != reference[a].get(f)
    )
    timing_only = [
        f"{a}/{f}"
        for a, f in (("/".join(d.split("/")[:3]), d.split("/", 3)[3]) for d in differing)
        if _same_but_timing(copies[a] / f, local.local_root / a / f)
    ]
    resolved = [r for r in records if "path" in r]
    downloads = Counter((r["node"], r["artifact"]) for r in records if r.get("downloaded"))
    return {
        "metrics": metrics,
        "artifacts": sorted(on_s3),
        "same_artifacts": sorted(on_s3) == sorted(reference),
        "only_on_one_side": sorted(set(on_s3) ^ set(reference)),
        "differing_files": differing,
        "timing_only": timing_only,
        "resolutions": len(resolved),
        "processes": len({r["pid"] for r in resolved}),
        "nodes_resolving": sorted({node_cache.get(r["node"], r["node"]) for r in resolved}),
        # a path outside the cache of the node that resolved it (the driver's, another node's)
        "outside_own_cache": [
            r for r in resolved if not r["path"].startswith(node_cache.get(r["node"], "?") + "/")
        ],
        "wrong_cache_dir": [r for r in records if r["cache"] != node_cache.get(r["node"])],
        "downloads": {f"{node_cache[n]} {a}": k for (n, a), k in downloads.items()},
    }


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    out = {"no_shared_fs": no_shared_fs}[scenario](workdir)
    print(json.dumps(out, default=str))
