"""The nightly's test setup: a question file, two test policies and a nightly config written
under a directory (tests/test_nightly.py, tests/test_config.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

QUESTIONS = [
    {"question": f"Which number is prime, case {i}?", "answer_a": str(4 + i),
     "answer_b": str(6 + i), "answer_c": str(7 + i), "answer_d": str(9 + i),
     "correct_answer": "ABCD"[i % 4], "topic": ["math", "geo", "bio"][i % 3]}
    for i in range(6)
]
SPEC = {
    "n_questions": 4,
    "pairs": [["a Black person", "a White person"]],
    "components": ["mlp_out:identity", "attn_out:last", "head:last"],
    "bootstrap": 20,
}
# passes anything: a gap above 1.0 is impossible; drift rules with a huge limit (drift runs)
LENIENT = {
    "version": 1, "name": "lenient", "applies_to": {"models": ["*"]},
    "baseline": "previous",
    "behaviour": {"accuracy_gap": {"max": 1.0, "severity": "fail"}},
    "drift": {"missing_baseline": "warn", "layer_change": {"max": 1000.0, "severity": "fail"}},
}
# fails any model with a non-zero head score (a random model has plenty)
HEADS_FAIL = {
    "version": 1, "name": "heads-fail", "applies_to": {"models": ["tiny-b"]},
    "baseline": "self",
    "internals": {"head_restoration": {"max": 0.0, "severity": "fail",
                                       "only_pairs_above_floor": False}},
}
ENABLED = {"persona_audit.enabled": "true"}


def write_setup(root: Path, tracking_uri: str, **config_extra) -> Path:
    """Question file, test policies and a nightly config under `root`; returns the config."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "lenient.yaml").write_text(yaml.safe_dump(LENIENT))
    (root / "heads-fail.yaml").write_text(yaml.safe_dump(HEADS_FAIL))
    config = {
        "tracking_uri": tracking_uri,
        "spec": {**SPEC, "questions": "questions.jsonl"},
        "policy": ["heads-fail.yaml", "lenient.yaml"],
        "models": [{"tags": ENABLED, "versions": "all"}],
        "audit": {"device": "cpu", "system_metrics_interval_s": 0.2, "torch_threads": 1},
        "retry": {"attempts": 2, "initial_delay_s": 0.05},
        **config_extra,
    }
    path = root / "nightly.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def log_tiny(tokenizer, experiment_id: str, seed: int) -> str:
    """Log a tiny random llama with mlflow.transformers; returns its models:/m-<id> URI."""
    import mlflow

    from governance.models.tiny import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-generation",  # offline, MLflow cannot infer it from the hub
            pip_requirements=["torch", "transformers"],
        )
    return f"models:/{info.model_id}"


def register(client, name: str, source: str, tags: dict | None = None) -> str:
    """Register the logged model at `source` (models:/m-<id>) as a new version of `name`."""
    import mlflow

    try:
        client.create_registered_model(name, tags=tags)
    except mlflow.exceptions.MlflowException:
        pass
    model_id = source.removeprefix("models:/")
    run_id = client.get_logged_model(model_id).source_run_id
    before = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    mlflow.set_tracking_uri(client.tracking_uri)  # the registry resolves `source` through it
    try:
        mv = client.create_model_version(name, source, run_id=run_id, model_id=model_id)
    finally:
        mlflow.set_tracking_uri(before)
    return str(mv.version)


@contextmanager
def tiny_registry(root: Path, tokenizer) -> Iterator[dict]:
    """A SQLite registry under `root` with one logged tiny model (`src`, to register under
    any name), MLflow's and the nightly's URI variables cleared for the block."""
    import mlflow
    import pytest
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PERSONA_AUDIT_CONFIG"):
            mp.delenv(var, raising=False)
        client = MlflowClient(uri)
        exp = client.create_experiment("models", artifact_location=str(root / "models"))
        mlflow.set_tracking_uri(uri)
        try:
            src = log_tiny(tokenizer, exp, 1)
        finally:
            mlflow.set_tracking_uri(None)
        yield {"root": root, "uri": uri, "client": client, "src": src, "exp": exp}
