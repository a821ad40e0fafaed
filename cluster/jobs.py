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
    return token_and_source()[0]


def token_and_source() -> tuple[str | None, str]:
    """The token and where it came from (for the error when a cluster refuses it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path.read_text().strip(), str(path)
    return None, ""


class TokenRefused(RuntimeError):
    """The cluster refused our token, or wanted one and got none: one line saying which token
    was sent and from where (issue 22: a raw AuthenticationError traceback, and a token silently
    read from another instance's ~/.ray/auth_token)."""


def client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token, source = token_and_source()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        sent = f"the token from {source}" if token else "no token (RAY_AUTH_TOKEN is not set)"
        raise TokenRefused(
            f"{address} refused {sent}: export RAY_AUTH_TOKEN=<the head's token> (the value the "
            "head was started with) and RAY_AUTH_MODE=token"
        ) from None


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
    c = client(address)
    deadline = time.monotonic() + 90
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
        except RuntimeError as e:
            # a head that has just started answers HTTP before its job agent is up (measured:
            # "No available agent to submit job" seconds after `/api/version` answered)
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


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
