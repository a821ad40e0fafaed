"""Ray Jobs API: submit a command with the repository as working_dir; status, logs, stop.

The token of the target cluster is sent as ``Authorization: Bearer <token>`` (Ray's token
authentication stays on). It is found, in order, in ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Only the code travels: data, runs, caches, virtualenvs and secrets stay on the client.
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "venv/",
    ".git/",
    "runs/",
    "store/",
    "datasets/",
    ".paperline/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    ".env",
    "*.pem",
    "*.key",
    "**/auth_token",
]


def find_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path.read_text().strip()
    return None


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def submit(
    address: str,
    entrypoint: str,
    working_dir: str | Path,
    *,
    env_vars: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    runtime_env = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return client(address).submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata
    )


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id))


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def wait(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Block until the job reaches a terminal state; returns it (``SUCCEEDED``, ``FAILED``, ...)."""
    from ray.job_submission import JobStatus

    c = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = c.get_job_status(job_id)
        if state in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(state)
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
