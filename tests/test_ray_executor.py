"""The nightly on Ray (`executor: ray`), on a local Ray instance this module starts: versions
audited in parallel, one version in two question shards equal to the in-process audit, and a
worker killed mid-task retried with nothing logged twice."""

from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest

from support.nightly import ENABLED, register, tiny_registry, write_setup

try:
    import ray
except ImportError as exc:  # the `ray` extra; CI installs it with `dev`
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("CI=true but Ray is not installed (pip install -e '.[dev]')") from exc
    pytest.skip(f"Ray is not installed: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reg(cluster, tmp_path_factory, tokenizer):
    with tiny_registry(tmp_path_factory.mktemp("ray"), tokenizer) as r:
        for name in ("tiny-a", "tiny-b"):
            register(r["client"], name, r["src"], ENABLED)
        # one CPU a task: two workers, each reused by the tasks after its first (a worker's
        # first task pays for importing torch, transformers and mlflow)
        r["config"] = write_setup(r["root"], r["uri"], executor="ray", ray={
            "shards": 1, "num_cpus": 1, "max_retries": 2, "parallel_versions": 2})
        yield r


class TaskWatch:
    """Polls this host's Ray workers (process title `ray::<task name>`) while a pass runs:
    which audit tasks ran at the same moment, and (with `kill`) SIGKILLs the first worker
    running a task whose name starts with it."""

    def __init__(self, kill: str | None = None):
        self.kill, self.killed, self.together = kill, [], []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._done.is_set():
            running = {}
            for p in psutil.process_iter(["cmdline"]):
                title = " ".join(p.info["cmdline"] or []).strip()
                if title.startswith("ray::audit "):
                    running[p.pid] = title.removeprefix("ray::")
            self.together.append(set(running.values()))
            for pid, name in running.items():
                if self.kill and not self.killed and name.startswith(self.kill):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(name)
            time.sleep(0.05)

    def __enter__(self) -> TaskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def _runs(client, name: str) -> list:
    exp = client.get_experiment_by_name("persona-audits")
    return client.search_runs([exp.experiment_id],
                              f"tags.`persona_audit.model_name` = '{name}'")


def test_two_versions_are_audited_in_parallel(reg):
    from jobs.config import load_config
    from jobs.nightly import run_pass

    with TaskWatch() as watch:
        report = run_pass(load_config(reg["config"]))
    # lenient warns on a first version (no baseline); heads-fail fails any random model
    assert {(o.name, o.status) for o in report.outcomes} == {("tiny-a", "warn"),
                                                             ("tiny-b", "fail")}, report.text()
    assert {"audit tiny-a v1 shard 1/1", "audit tiny-b v1 shard 1/1"} in watch.together, \
        "the two versions' tasks never ran at the same time"
    for name in ("tiny-a", "tiny-b"):
        assert len(_runs(reg["client"], name)) == 1


def test_a_killed_worker_is_retried_and_two_shards_equal_the_in_process_audit(reg):
    """A worker SIGKILLed while it audits one of two shards: Ray runs the shard again, the
    merged audit equals the in-process audit of the same model bit for bit (both read back
    from their CSV files), and the run, its metrics and the approval record exist once."""
    from governance.audit.result import AuditResult
    from governance.audit.run import run_audit
    from governance.models.loading import load_model
    from governance.tracking.runs import load_audit
    from jobs.config import load_config
    from jobs.connection import mlflow_uris
    from jobs.nightly import run_pass
    from jobs.spec import load_spec

    client = reg["client"]
    version = register(client, "tiny-c", reg["src"], ENABLED)
    config = load_config(reg["config"], **{"ray.shards": 2})
    with TaskWatch(kill="audit tiny-c v1 shard 2/2") as watch:
        report = run_pass(config, models=["tiny-c"])
    assert watch.killed, "the second shard's task was never seen running"
    [outcome] = report.outcomes
    assert outcome.status == "warn", report.text()
    assert [r.info.run_id for r in _runs(client, "tiny-c")] == [outcome.run_id]
    assert len(client.get_metric_history(outcome.run_id, "nightly_wall_time_s")) == 1
    record = client.get_model_version("tiny-c", version)
    assert record.tags["persona_audit.run_id"] == outcome.run_id
    assert record.description.count("[persona audit ") == 1  # one approval line

    sharded = load_audit(f"runs:/{outcome.run_id}", client=client,
                         download_dir=reg["root"] / "sharded")
    assert sharded.meta["run"]["shards"] == 2
    with mlflow_uris(config):
        loaded = load_model(reg["src"], device="cpu")
    one = run_audit(loaded, load_spec(config)[0], progress=False)
    one = AuditResult.load(one.save(reg["root"] / "one"))
    for table in AuditResult.TABLES:
        pd.testing.assert_frame_equal(getattr(sharded, table), getattr(one, table),
                                      check_exact=True, obj=table)
    for key in ("question_ids", "spec_sha256", "noise_floor"):
        assert sharded.meta[key] == one.meta[key], key


def test_a_task_that_fails_is_recorded_error_with_its_reason(reg, tmp_path):
    """An error raised by the audit itself (here: a version with no model behind it) is the
    version's `error`, with the reason, after one attempt."""
    from jobs.config import load_config
    from jobs.nightly import run_pass

    client = reg["client"]
    client.create_registered_model("broken-r", tags=ENABLED)
    (tmp_path / "empty").mkdir()
    client.create_model_version("broken-r", source=str(tmp_path / "empty"))
    report = run_pass(load_config(reg["config"]), models=["broken-r"])
    [outcome] = report.outcomes
    assert outcome.status == "error" and outcome.run_id, report.text()
    assert outcome.reason.startswith("ModelLoadError: ") and "no MLmodel file" in outcome.reason
    assert client.get_model_version("broken-r", "1").tags["persona_audit.status"] == "error"


def test_a_version_over_its_time_limit_is_cancelled_and_recorded_error(reg):
    """`audit.timeout_s` holds on Ray too: the tasks are cancelled (their workers killed) and
    the version is `error`, never given a verdict."""
    from jobs.config import load_config
    from jobs.nightly import run_pass

    client = reg["client"]
    version = register(client, "tiny-d", reg["src"], ENABLED)
    # a limit no audit can meet: a warm worker audits the tiny model in well under 0.2 s
    config = load_config(reg["config"], **{"audit.timeout_s": 0.001})
    report = run_pass(config, models=["tiny-d"])
    [outcome] = report.outcomes
    assert outcome.status == "error" and "timed out" in outcome.reason, report.text()
    assert client.get_model_version("tiny-d", version).tags["persona_audit.status"] == "error"
