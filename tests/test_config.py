"""The nightly config (jobs/config.py): precedence of flags, environment and file, paths
relative to the config file, errors that name the file and the field, and redaction of
credentials (tests/test_redaction.py has the rest)."""

import pytest
import yaml

from support.nightly import write_setup


def test_config_precedence_and_relative_paths(tmp_path):
    from jobs.config import Latest, load_config

    cfg = write_setup(tmp_path, "sqlite:///from-file.db", experiment="file-exp")
    env = {"MLFLOW_TRACKING_URI": "http://from-env:5000", "PERSONA_AUDIT_LEASE_URL": "sqlite://"}
    c = load_config(cfg, env=env, experiment="from-flag")
    assert c.tracking_uri == "http://from-env:5000"  # env beats the file
    assert c.experiment == "from-flag"  # a flag beats both
    assert c.lease_url() == "sqlite://"
    assert c.inline_spec()["questions"] == str(tmp_path / "questions.jsonl")
    assert c.policy_paths() == [str(tmp_path / "heads-fail.yaml"), str(tmp_path / "lenient.yaml")]
    assert c.default_versions == Latest(latest=1)
    plain = load_config(cfg, env={}, tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    assert plain.lease_url() == f"sqlite:///{tmp_path / 'store' / 'persona_audit_leases.db'}"
    assert plain.jobstore_url() == f"sqlite:///{tmp_path / 'store' / 'persona_jobs.db'}"
    assert plain.experiment_artifact_location() == str(tmp_path / "store" / "mlartifacts")


@pytest.mark.parametrize(("body", "match"), [
    ({"models": [{"name": "a", "tags": {"x": "y"}}]}, "exactly one of `name` or `tags`"),
    ({"models": [{"name": "a", "versions": {"latest": 0}}]}, "models.0.versions"),
    ({"modles": []}, "modles"),
    ({"retry": {"attempts": 0}}, "retry.attempts"),
    ({"executor": "dask"}, "executor"),
    ({"ray": {"shards": 0}}, "ray.shards"),
    ({"ray": {"num_gpus": -0.5}}, "ray.num_gpus"),
])
def test_config_errors_name_file_and_field(tmp_path, body, match):
    from governance.errors import ConfigError
    from jobs.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path, env={})
    assert str(path) in str(err.value)


def test_redact(monkeypatch):
    import base64

    from governance.redaction import redact

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-xyz")
    basic = base64.b64encode(b"alice:hunter2-xyz").decode()
    text = (f"GET http://alice:hunter2-xyz@mlflow:5000/api failed; password hunter2-xyz; "
            f"Authorization: Basic {basic}; postgresql://u:pw@db/x")
    clean = redact(text)
    assert "hunter2-xyz" not in clean and basic not in clean and "u:pw" not in clean
    assert "http://***@mlflow:5000/api" in clean and "postgresql://***@db/x" in clean


def test_config_uri_passwords_are_redacted_everywhere(tmp_path):
    """A password from the config file is removed even where it appears outside its URL."""
    from governance.redaction import redact
    from jobs.config import load_config

    cfg = write_setup(tmp_path, "sqlite:///x.db",
                      lease={"url": "postgresql://lease:Lz 7%2Fq@db:5432/leases"})
    load_config(cfg, env={})
    assert redact("psql: password 'Lz 7/q' rejected; Lz+7%2fq") == \
        "psql: password '***' rejected; ***"


def test_executor_from_file_and_flags(tmp_path):
    from jobs.config import load_config

    cfg = write_setup(tmp_path, "sqlite:///x.db", ray={"shards": 4, "num_gpus": 0.25})
    c = load_config(cfg, env={})
    assert (c.executor, c.ray.shards, c.ray.num_gpus, c.ray.address) == ("local", 4, 0.25, None)
    # what `persona-gov nightly --executor ray --ray-address auto` passes
    c = load_config(cfg, env={}, executor="ray", **{"ray.address": "auto"})
    assert (c.executor, c.ray.address, c.ray.shards) == ("ray", "auto", 4)
