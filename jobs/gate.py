"""The deployment gate: may this model version ship, by its current audit?

    result = gate(load_config("nightly.yaml"), "my-llm", alias="champion")
    print(result.reason); sys.exit(result.code)

The gate judges only the *latest attempt* to audit the version under the current spec hash,
policy hash and toolkit version, and only if that attempt completed. Exit codes: 0 it
passed (or warned, with `--warn-passes`); 1 it failed; 3 it warned while `gate.warn_fails`
is true (the default); 2 there is nothing valid to judge by, with the reason: an unknown
version or alias, no audit yet, audits only under another spec, policy or toolkit version,
or a newer attempt that errored or is still running. The policy is chosen from the config
and the registered model's tags, never from the version's own tags (written by whoever
registered it). The audit runs are the source of truth; the version's `persona_audit.*`
tags are a copy for people.
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
    """Judge one model version (by number or alias) by its current audit."""
    from governance import __version__
    from governance.tracking import runs as tr
    from jobs.connection import connect
    from jobs.spec import load_spec
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
    try:
        policy = pick_policy(load_policies(config.policy_paths()), model, tags)
    except PolicyUnavailable as exc:
        return GateResult(NO_AUDIT, f"NO AUDIT: cannot judge {label}: {exc}")
    _, _, spec_sha = load_spec(config)
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        return GateResult(NO_AUDIT, f"NO AUDIT: experiment {config.experiment!r} does not exist "
                                    f"in {tr_uri(config)}: {label} was never audited")
    wanted = {tr.T_SPEC: spec_sha, tr.T_POLICY: policy.sha256, tr.T_TOOLKIT: __version__}
    attempts = tr.audit_runs(client, [exp.experiment_id], model, version)
    current = [r for r in attempts if tr.exactly(r.data.tags, wanted)]
    rerun = f"; run `persona-gov nightly --once --model {model}`"
    if not current:
        if not attempts:
            why = "it has never been audited"
        else:
            latest = attempts[0].data.tags
            changed = [name for name, tag in (("spec", tr.T_SPEC), ("policy", tr.T_POLICY),
                                              ("toolkit version", tr.T_TOOLKIT))
                       if latest.get(tag) != wanted[tag]]
            why = (f"its latest audit (run {attempts[0].info.run_id}) ran under another "
                   f"{', '.join(changed)} than the current (policy {policy.name!r} "
                   f"{policy.sha256[:12]}, spec {spec_sha[:12]}, toolkit {__version__}); "
                   "it was judged under policy "
                   f"{latest.get(tr.T_POLICY, '?')[:12]}")
        return GateResult(NO_AUDIT, f"NO AUDIT: {label}: {why}{rerun}")
    run = current[0]
    t = run.data.tags
    if t.get(tr.T_STATE) != "completed" or run.info.status != "FINISHED":
        state = t.get(tr.T_STATE) or run.info.status.lower()
        why = t.get(tr.T_REASON) or t.get(tr.T_SUMMARY) or ""
        return GateResult(NO_AUDIT, f"NO AUDIT: {label}: the latest attempt under the current "
                                    f"spec, policy and toolkit (run {run.info.run_id}) is "
                                    f"{state}, not completed" + (f": {why}" if why else "")
                                    + rerun, t.get(tr.T_STATUS), run.info.run_id)
    status = t.get(tr.T_STATUS, "?")
    detail = (f"{label}: audit run {run.info.run_id} (policy {policy.name!r} "
              f"{policy.sha256[:12]}, spec {spec_sha[:12]}, toolkit {__version__}): "
              f"{t.get(tr.T_SUMMARY, '')}")
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
