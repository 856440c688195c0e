"""Audits on a Ray cluster: one task per (version, question shard), merged on the driver.

    executor = RayExecutor(config.ray)             # joins config.ray.address, or starts Ray
    result = executor.audit(job, timeout_s=3600)   # AuditJob as for the child process
    executor.close()

`persona-gov nightly --executor ray` (or `executor: ray` in the nightly config). Each task
loads the registered model exactly as the isolated child does (`jobs.isolation.
load_job_model`: config, safetensors and tokenizer files only, unless the config trusts the
model by name), audits its shard's questions (`governance.audit.shards.run_shard`) and
returns the shard's raw numbers as bytes (JSON and a numpy archive, read back with
`allow_pickle=False`). The driver merges them into the audit one run would have produced and
then does everything the nightly does with one result: the workers never touch MLflow's
tracking store, so a task that Ray runs again after its worker died logs nothing twice.

With `screen: atp` and several shards, one screen task ranks the patches over all questions
first and every shard patches what it chose. Tasks ask for `ray.num_gpus` GPUs (fractional:
small models share a GPU) and `ray.num_cpus` CPUs; Ray runs a task again up to
`ray.max_retries` times when its worker process or node dies (an error raised by the audit
itself is not retried). Ray is an optional extra: `pip install 'persona-governance[ray]'`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError
from jobs.isolation import AuditFailed, AuditJob

if TYPE_CHECKING:
    from governance.audit.result import AuditResult
    from jobs.config import RayOptions

log = logging.getLogger(__name__)

_POLL_S = 0.5


def _shard_task(job: dict[str, Any], index: int, count: int,
                chosen: dict[str, list[list[Any]]] | None) -> bytes:
    """In a Ray worker: load the model, audit shard `index` of `count`, return its bytes."""
    from governance.audit.shards import Shard, patch_from, run_shard
    from governance.audit.spec import AuditSpec
    from jobs.isolation import load_job_model

    audit_job = AuditJob(**job)
    picks = None if chosen is None else {k: [patch_from(p) for p in v]
                                         for k, v in chosen.items()}
    partial = run_shard(load_job_model(audit_job), AuditSpec.model_validate(audit_job.spec),
                        Shard(index, count), chosen=picks, chunk_rows=audit_job.chunk_rows,
                        progress=False)
    return partial.to_bytes()


def _screen_task(job: dict[str, Any], workers: int) -> dict[str, dict[str, Any]]:
    """In a Ray worker: the AtP screen of every pair over all questions (with a budget, the
    plan's choice for `workers` shards), as plain data."""
    from governance.audit.shards import choose_patches
    from governance.audit.spec import AuditSpec
    from jobs.isolation import load_job_model

    audit_job = AuditJob(**job)
    screen = choose_patches(load_job_model(audit_job), AuditSpec.model_validate(audit_job.spec),
                            workers=workers)
    return {label: choice.to_json() for label, choice in screen.items()}


class RayExecutor:
    """Runs audits as Ray tasks; see the module docstring. `should_abort` is polled while
    waiting: when it returns true the version's tasks are cancelled and the wait raises
    KeyboardInterrupt (the nightly's Ctrl-C/SIGTERM)."""

    def __init__(self, options: RayOptions, *,
                 should_abort: Callable[[], bool] = lambda: False) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("executor: ray needs Ray, which is not installed: pip install "
                              "'persona-governance[ray]'") from exc
        self.options = options
        self.should_abort = should_abort
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(address=options.address, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
            self._started = True
        # a GPU task's worker exits after it, so the next task finds the GPU memory free
        max_calls = 1 if options.num_gpus > 0 else 0
        common = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                  "max_retries": options.max_retries, "retry_exceptions": False,
                  "max_calls": max_calls}
        self._shard = ray.remote(**common)(_shard_task)
        self._screen = ray.remote(**common)(_screen_task)

    def audit(self, job: AuditJob, *, timeout_s: float | None) -> AuditResult:
        """The merged audit of `job` over `options.shards` question shards; raises
        `AuditFailed` when a task fails, its worker died more than `max_retries` times, or the
        whole takes longer than `timeout_s`."""
        from governance.audit.shards import AuditPartial, ScreenChoice, merge

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        count = self.options.shards
        plain = asdict(job)
        what = f"{job.registered_name} v{job.registered_version}"
        screen = None
        chosen = None
        if job.spec.get("screen") == "atp" and count > 1:
            ref = self._screen.options(name=f"screen {what}").remote(plain, count)
            raw = self._wait([ref], deadline, what)[0]
            screen = {k: ScreenChoice.from_json(v) for k, v in raw.items()}
            chosen = {k: v["chosen"] for k, v in raw.items()}
        refs = [self._shard.options(name=f"audit {what} shard {i + 1}/{count}")
                .remote(plain, i, count, chosen) for i in range(count)]
        parts = [AuditPartial.from_bytes(b) for b in self._wait(refs, deadline, what)]
        return merge(parts, screen)

    def _wait(self, refs: list[Any], deadline: float | None, what: str) -> list[Any]:
        ray = self._ray
        pending = list(refs)
        try:
            while pending:
                if self.should_abort():
                    raise KeyboardInterrupt(f"interrupted while auditing {what}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AuditFailed(f"timed out after the audit's time limit (its Ray tasks "
                                      f"were cancelled): {what}")
                wait = _POLL_S if left is None else min(_POLL_S, left)
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=wait)
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise AuditFailed(f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.WorkerCrashedError as exc:
            raise AuditFailed(f"the audit task's worker died {self.options.max_retries + 1} "
                              f"times (out of memory?): {exc}") from None
        except ray.exceptions.RayError as exc:
            raise AuditFailed(f"Ray could not finish the audit: {type(exc).__name__}: "
                              f"{exc}") from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut Ray down if this executor started it (a cluster it joined stays up)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False
