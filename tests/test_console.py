"""What the terminal shows (jobs/console.py), in a fresh interpreter each time: logging is
process-wide, and pytest's own handlers would hide what the CLI's handler does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SAY = """
import json, logging, os, sys, warnings
from jobs.console import configure, configure_child, quiet_prints, settings
parent = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
if parent is not None:
    configure_child(parent)
else:
    configure(verbose=sys.argv[1] == "verbose")
hub = logging.getLogger("mlflow.transformers")
hub.warning("The model card could not be retrieved from the hub due to Repo id must be ...")
hub.warning("Unable to find license information for this model. Please verify ...")
logging.getLogger("mlflow.store").warning("database is locked: retrying")
chatty = logging.getLogger("great_expectations.data_context.types.base")
chatty.setLevel(logging.INFO)  # a library that sets its own logger's level
chatty.info("Created temporary directory '/tmp/x' for ephemeral docs site")
for _ in range(3):
    logging.getLogger("governance.inputs.questions").warning(
        "%s: skipped %d stray header row(s)", "mmlu.jsonl", 2)
logging.getLogger("governance.inputs.questions").warning("other.jsonl: skipped 1 row")
warnings.warn("`generation_config` default values have been modified", UserWarning)
logging.getLogger("jobs.nightly").info("auditing persona-demo v1")
with quiet_prints("MLflow"):
    print("Successfully registered model 'persona-demo'.", file=sys.stderr)
    logging.getLogger("jobs.demo").warning("registering inside the block")
print(os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"),
      os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
print(json.dumps(settings()))
"""


def _say(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SAY, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})


@pytest.fixture(scope="module")
def default():
    return _say("default")


def test_expected_third_party_warnings_are_left_out(default):
    err = default.stderr
    assert default.returncode == 0, err
    assert "model card" not in err and "license information" not in err
    assert "generation_config" not in err  # a Python warning, routed through logging
    assert "database is locked: retrying" in err  # a third-party warning that matters stays
    assert "ephemeral docs site" not in err  # a third party's info record
    assert "INFO jobs.nightly: auditing persona-demo v1" in err
    assert "Successfully registered model" not in err  # a library's own print
    assert "registering inside the block" in err  # our records still reach the terminal
    bars = default.stdout.splitlines()[0]
    assert bars == "false 1"  # MLflow's artifact bars and the hub's/transformers' bars off


def test_a_repeated_warning_is_said_once(default):
    assert default.stderr.count("mmlu.jsonl: skipped 2 stray header row(s)") == 1
    assert "other.jsonl: skipped 1 row" in default.stderr  # another input is still said


def test_verbose_shows_everything():
    got = _say("verbose")
    assert got.returncode == 0, got.stderr
    assert "model card could not be retrieved" in got.stderr
    assert "license information" in got.stderr and "generation_config" in got.stderr
    assert "ephemeral docs site" in got.stderr
    assert got.stderr.count("stray header row(s)") == 3
    assert "Successfully registered model 'persona-demo'." in got.stderr
    assert got.stdout.splitlines()[0] == "None None"  # libraries keep their progress bars


def test_an_audit_child_does_not_repeat_what_the_parent_said(default):
    parent = json.loads(default.stdout.splitlines()[1])
    assert parent["verbose"] is False and parent["said"]
    child = _say("default", json.dumps(parent))
    assert child.returncode == 0, child.stderr
    assert "stray header row(s)" not in child.stderr
    assert "database is locked" not in child.stderr  # said by the parent already
    assert "INFO jobs.nightly: auditing persona-demo v1" in child.stderr  # info is not deduped
