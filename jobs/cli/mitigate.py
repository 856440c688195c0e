"""`persona-gov mitigate`: what would switching off the components an audit flags buy, and
what would it cost? Ablates the audit's top-k components (heads by restoration score; MLP and
attention outputs on request) at inference time, on questions the audit did not use, beside k
random components, and writes the trade-off (and logs it to MLflow, linked to the audit run,
when the audit is an MLflow run). The model's weights are never changed.

    persona-gov mitigate --audit docs/results/smollm2-readme --model smollm2-135m-instruct \\
        --top-k 1 2 4 8 16 --out out/mitigation
    persona-gov mitigate --audit runs:/<audit run id> --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import logging
import sys

from governance.errors import ConfigError
from governance.files import check_replaceable
from governance.mitigation.spec import ABLATABLE, METHODS

log = logging.getLogger("governance")


def add_cli(sub) -> None:
    p = sub.add_parser(
        "mitigate",
        help="what-if: switch off the audit's flagged components, measure shift and accuracy",
        description=(__doc__ or "").split("\n\n")[0].replace("`persona-gov mitigate`: ", ""),
        epilog=(
            "examples:\n"
            "  persona-gov mitigate --audit out/audit --model ./model_dir --top-k 1 2 4 "
            "--out out/mitigation\n"
            "  persona-gov mitigate --audit runs:/<audit run id> --tracking-uri "
            "sqlite:///mlflow.db --method zero\n\n"
            "outputs: effects.csv (per k, selection and pair/persona: shift, flip rate, TV, "
            "accuracy, each with a bootstrap 95% interval and its change against the unablated "
            "model), curve.csv (the trade-off per condition), selections.csv (which components "
            "each selection switched off), mitigation.json (spec, model, the ranking/held-out "
            "question split), mitigation.html + mitigation_tradeoff.png (the trade-off curve), "
            "and with MLflow a run linked to the audit run holding the same."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--audit", required=True,
                   help="the audit whose ranking to use: its directory or runs:/<run_id>")
    p.add_argument("--model",
                   help="the model to ablate (any source `persona-gov audit --model` takes); "
                        "default: the audited model version (models:/<name>/<version>) of a "
                        "runs:/ audit, else the source audit.json records")
    p.add_argument("--top-k", nargs="+", type=int, metavar="K",
                   help="numbers of components to switch off (default: 1 2 4 8 16)")
    p.add_argument("--method", choices=METHODS,
                   help="mean (default): the component's mean output over the no-persona run "
                        "of the audit's questions; zero; resample: another of those questions' "
                        "mean output, drawn per held-out question")
    p.add_argument("--components", nargs="+", choices=ABLATABLE,
                   help="kinds of component the ranking may pick (default: head)")
    p.add_argument("--rank-positions", choices=["all", "last"],
                   help="rank by the audit's scores at these positions (default: all if the "
                        "audit has them, else last)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("CLEAN", "CORRUPT"),
                   help="measure only this audit pair (repeatable; the noise floor is kept)")
    p.add_argument("--questions",
                   help="question set the held-out questions come from (default: the audit's)")
    p.add_argument("--n-heldout", type=int, help="held-out questions (default 40)")
    p.add_argument("--seed", type=int, help="held-out sample and bootstrap seed (default 0)")
    p.add_argument("--random-seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds of the random control (default: 0 1 2)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000)")
    p.add_argument("--policy",
                   help="policy YAML whose `mitigation` block judges the what-if (e.g. "
                        "localised: the top 4 halve the shift at under a point of accuracy); "
                        "its findings are printed and recorded; the exit code stays 0")
    p.add_argument("--out", help="output directory (new, empty, or an earlier what-if's)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI of a runs:/ audit (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="with a runs:/ audit: do not log a mitigation run")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.add_argument("--chunk-rows", type=int, default=32, help="ablated rows per forward")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model directory (off by default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_mitigate)


def _default_model(audit, run_tags: dict[str, str] | None) -> str:
    from governance.tracking.runs import T_MODEL, T_VERSION

    if run_tags and run_tags.get(T_MODEL) and run_tags.get(T_VERSION):
        return f"models:/{run_tags[T_MODEL]}/{run_tags[T_VERSION]}"
    source = (audit.meta.get("model") or {}).get("source")
    if not source:
        raise ConfigError("the audit records no model source: pass --model")
    return str(source)


def _mitigation_rules(path: str):
    from governance.judge.policy import load_policy

    policy = load_policy(path)
    if policy.mitigation is None:
        raise ConfigError(f"policy {path} has no `mitigation` block to judge the what-if by")
    return policy.mitigation


def _cmd_mitigate(args: argparse.Namespace) -> int:
    from governance.mitigation import MitigationSpec, run_mitigation
    from governance.models.loading import load_model, resolve_model
    from governance.tracking.runs import load_audit
    from jobs.console import quiet_prints

    spec = MitigationSpec.make(
        top_k=tuple(args.top_k) if args.top_k else None, method=args.method,
        components=tuple(args.components) if args.components else None,
        rank_positions=args.rank_positions,
        pairs=[tuple(p) for p in args.pair] if args.pair else None,
        n_heldout=args.n_heldout, seed=args.seed,
        random_seeds=tuple(args.random_seeds) if args.random_seeds else None,
        bootstrap=args.bootstrap)
    from_run = args.audit.startswith("runs:/")
    log_run = from_run and not args.no_mlflow
    if not args.out and not log_run:
        raise ConfigError("nowhere to write the what-if: pass --out DIR (or a runs:/ audit, "
                          "which is logged to MLflow)")
    if args.out:
        check_replaceable(args.out, "mitigation.json", "mitigation what-if")  # before any work
    rules = _mitigation_rules(args.policy) if args.policy else None
    client, run_tags, audit_run_id = None, None, None
    if from_run:
        from mlflow import MlflowClient

        client = MlflowClient(args.tracking_uri)
        audit_run_id = args.audit[len("runs:/"):].strip("/").partition("/")[0]
        run_tags = client.get_run(audit_run_id).data.tags
    audit = load_audit(args.audit, client=client)
    model = args.model or _default_model(audit, run_tags)
    log.info("loading model %s", model)
    with quiet_prints("GGUF conversion"):  # transformers' bar for a ~2 s step
        source = resolve_model(model)
    loaded = load_model(source, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    result = run_mitigation(loaded, audit, spec, questions=args.questions,
                            chunk_rows=args.chunk_rows, progress=not args.no_progress,
                            audit_source=args.audit)
    print(result.summary())
    if rules is not None:
        findings = rules.check(result.curve)
        result.meta["policy"] = {"path": args.policy,
                                 "findings": [f.__dict__ for f in findings]}
        print("\npolicy (mitigation block):")
        for f in findings:
            print(f"  {f.outcome:<5} {f.rule} {f.scope}: {f.evidence}")
    if args.out:
        from governance.report.mitigation import render_mitigation_page

        out = result.save(args.out)
        render_mitigation_page(result, out / "mitigation.html")
        print(f"\nwrote {out}/ (effects.csv, curve.csv, selections.csv, mitigation.json, "
              "mitigation.html, mitigation_tradeoff.png)")
    if log_run:
        from governance.tracking.mitigation import log_mitigation

        experiment_id = client.get_run(audit_run_id).info.experiment_id
        run_id = log_mitigation(client, experiment_id, result, audit_run_id=audit_run_id)
        print(f"logged mitigation run {run_id} (linked to audit run {audit_run_id})",
              file=sys.stdout)
    return 0
