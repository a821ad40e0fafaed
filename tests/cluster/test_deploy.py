"""The cluster recipes in cluster/deploy: what a user applies must start GPU workers on demand,
give every node (and the job submitter) the token, and ship the code without local state."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"


def test_ray_up_config_is_valid_and_starts_gpu_workers_with_the_shared_token():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema for `ray up`, defaults filled
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 < gpu["max_workers"]
    assert config["available_node_types"]["head"]["resources"]["GPU"] == 0
    # the client's token file goes to every node (head and workers); every ray start uses it
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])
    assert {".venv", "store", "runs"} <= set(config["rsync_exclude"])


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_gives_every_pod_the_token_and_autoscales_gpu_workers_from_zero():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]
    cluster = job["rayClusterSpec"]
    pods = [job["submitterPodTemplate"], cluster["headGroupSpec"]["template"]]
    pods += [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in _containers(pod):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], c["name"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and gpu["rayStartParams"]["num-gpus"]
    assert "--store s3://" in job["entrypoint"]  # no shared filesystem assumed
