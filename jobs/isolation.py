"""One audit in a child process, under a time limit.

    result = audit_in_child(job, timeout_s=3600, work_dir=tmp)

The nightly audits models that other teams registered. Running each audit in its own
process means that a crash, an out-of-memory kill or a hang of one version cannot take the
pass down: the parent waits at most `timeout_s`, kills the child if it is still running, and
raises `AuditFailed` with the reason ("timed out after 3600 s", "the audit process was
killed by SIGKILL", or the child's own error message). The child writes its result as an
audit directory (`AuditResult.save`), which the parent reads back; nothing is unpickled from
the child. The child is started with `spawn`, so it shares no state with the parent, and it
exits when the parent dies (killed, out of memory): no orphaned audit keeps holding memory or
a GPU while the rerun audits the version again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import GovernanceError
from jobs.console import configure_child, read_said, write_said

if TYPE_CHECKING:
    from governance.audit.result import AuditResult

log = logging.getLogger(__name__)

ERROR_FILE = "child-error.json"


class AuditFailed(GovernanceError):
    """The audit did not finish: it timed out, crashed, or raised."""


@dataclass(frozen=True)
class AuditJob:
    """Everything the child needs, as plain data."""

    model_uri: str
    spec: dict[str, Any]  # AuditSpec.model_dump(mode="json")
    tracking_uri: str
    registry_uri: str | None
    device: str | None
    dtype: str | None
    chunk_rows: int | None
    torch_threads: int | None
    trust_remote_code: bool
    allow_pickle: bool
    registered_name: str
    registered_version: str
    console: dict[str, Any] | None = None  # jobs.console.settings() of the parent


def audit_in_child(job: AuditJob, *, timeout_s: float | None, work_dir: Path) -> AuditResult:
    """Run `job` in a spawned child process and return its result; raise `AuditFailed` if it
    times out (the child is killed), dies, or fails."""
    from governance.audit.result import AuditResult

    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(asdict(job), str(out)), name=f"audit {job.registered_name}",
        daemon=True)
    proc.start()
    try:
        proc.join(timeout_s)
        if proc.is_alive():
            _stop(proc)
            raise AuditFailed(f"timed out after {timeout_s:g} s (the audit process was killed)")
    except BaseException:
        _stop(proc)
        raise
    finally:
        read_said(out)  # what the child warned about is not said again in this run
    if proc.exitcode != 0:
        error = out / ERROR_FILE
        if error.exists():
            raise AuditFailed(json.loads(error.read_text())["message"])
        raise AuditFailed(f"the audit process {_death(proc.exitcode)}")
    return AuditResult.load(out)


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(10)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode} without writing its result"


def _exit_with_parent() -> None:
    """In the child: exit as soon as the parent process is gone. The kernel kills the child
    when its parent dies (Linux: PR_SET_PDEATHSIG), and a watcher thread exits it when the
    parent's end of the spawn pipe closes (everywhere, and when the parent died before the
    first could be set)."""
    import os
    import sys
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing
        return
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _child(job: dict[str, Any], out: str) -> None:
    """The child's entry point: load, audit, save; any error goes to child-error.json."""
    import os
    import sys

    _exit_with_parent()
    configure_child(job.get("console"))
    try:
        result = _audit(AuditJob(**job))
        result.save(out)
        write_said(out)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit non-zero
        from governance.redaction import redact

        write_said(out)

        message = redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        Path(out, ERROR_FILE).write_text(json.dumps(
            {"message": message, "traceback": redact(traceback.format_exc())}))
        sys.stderr.flush()
        os._exit(1)


def _audit(job: AuditJob) -> AuditResult:
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec

    return run_audit(load_job_model(job), AuditSpec.model_validate(job.spec),
                     chunk_rows=job.chunk_rows, progress=False)


def load_job_model(job: AuditJob) -> Any:
    """The registered model of `job`, loaded in a worker (a child process here, a Ray task
    in `jobs.ray_executor`): its own code and pickle weights only where the config trusts
    it (`job.trust_remote_code`, `job.allow_pickle`)."""
    import mlflow
    import torch

    from governance.models.loading import load_model

    mlflow.set_tracking_uri(job.tracking_uri)
    mlflow.set_registry_uri(job.registry_uri or job.tracking_uri)
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    loaded = load_model(job.model_uri, device=job.device, dtype=job.dtype,
                        trust_remote_code=job.trust_remote_code, allow_pickle=job.allow_pickle)
    loaded.identity["registered_name"] = job.registered_name
    loaded.identity["registered_version"] = job.registered_version
    return loaded
