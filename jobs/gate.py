"""The deployment gate: may this model version ship, by its latest completed audit?

    result = gate(load_config("nightly.yaml"), "my-llm", alias="champion")
    print(result.reason); sys.exit(result.code)

Exit codes: 0 the latest completed audit of the version passed under the current policy;
1 it failed, or warned while `gate.warn_fails` is true (the default); 2 there is no valid
audit to judge by (unknown version or alias, no audit yet, or audits only under another
policy: run `persona-gov nightly --once --model NAME`). The audit runs are the source of
truth; the version's `persona_audit.*` tags are a copy for people.
"""

from __future__ import annotations

from dataclasses import dataclass

from governance.redaction import redact
from jobs.cli.exits import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_PASS, EXIT_WARN
from jobs.config import NightlyConfig

PASS, FAIL, NO_AUDIT, WARN = EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_WARN


@dataclass(frozen=True)
class GateResult:
    code: int
    reason: str
    status: str | None = None
    run_id: str | None = None


def gate(config: NightlyConfig, model: str, *, version: str | None = None,
         alias: str | None = None, warn_fails: bool | None = None) -> GateResult:
    """Judge one model version (by number or alias) by its latest completed audit."""
    from governance.tracking import runs as tr
    from jobs.connection import connect
    from jobs.verdict import PolicyUnavailable, load_policies, pick_policy

    if (version is None) == (alias is None):
        raise ValueError("give exactly one of version or alias")
    warn_fails = config.gate.warn_fails if warn_fails is None else warn_fails
    client = connect(config)
    what = f"{model} " + (f"v{version}" if version else f"@{alias}")
    try:
        mv = (client.get_model_version(model, version) if version
              else client.get_model_version_by_alias(model, alias))
    except Exception as exc:
        return GateResult(NO_AUDIT, f"NO AUDIT: {what} not found in the registry: "
                                    f"{redact(exc)}")
    version = str(mv.version)
    label = f"{model} v{version}" + (f" (@{alias})" if alias else "")
    tags = dict(client.get_registered_model(model).tags or {})
    tags.update(mv.tags or {})
    try:
        policy = pick_policy(load_policies(config.policy_paths()), model, tags)
    except PolicyUnavailable as exc:
        return GateResult(NO_AUDIT, f"NO AUDIT: cannot judge {label}: {exc}")
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        return GateResult(NO_AUDIT, f"NO AUDIT: experiment {config.experiment!r} does not exist "
                                    f"in {tr_uri(config)}: {label} was never audited")
    run = tr.find_audit_run(client, [exp.experiment_id], model, version,
                            policy_sha256=policy.sha256)
    if run is None:
        other = tr.find_audit_run(client, [exp.experiment_id], model, version)
        if other is None:
            why = "it has no completed audit"
        else:
            why = (f"its latest completed audit (run {other.info.run_id}) was judged under "
                   f"policy {other.data.tags.get(tr.T_POLICY, '?')[:12]}, not the current "
                   f"{policy.name!r} ({policy.sha256[:12]})")
        return GateResult(NO_AUDIT, f"NO AUDIT: {label}: {why}; run `persona-gov nightly "
                                    f"--once --model {model}` first")
    t = run.data.tags
    status = t.get(tr.T_STATUS, "?")
    detail = (f"{label}: audit run {run.info.run_id} (policy {policy.name!r} "
              f"{policy.sha256[:12]}, spec {t.get(tr.T_SPEC, '?')[:12]}, toolkit "
              f"{t.get(tr.T_TOOLKIT, '?')}): {t.get(tr.T_SUMMARY, '')}")
    if status == "pass":
        return GateResult(PASS, f"PASS: {detail}", status, run.info.run_id)
    if status == "warn":
        code = WARN if warn_fails else PASS
        rule = "warnings fail the gate" if warn_fails else "warnings pass the gate"
        return GateResult(code, f"WARN ({rule}): {detail}", status, run.info.run_id)
    if status == "fail":
        return GateResult(FAIL, f"FAIL: {detail}", status, run.info.run_id)
    return GateResult(NO_AUDIT, f"NO AUDIT: {detail}: unexpected status {status!r}", status,
                      run.info.run_id)


def tr_uri(config: NightlyConfig) -> str:
    return redact(config.tracking_uri)
