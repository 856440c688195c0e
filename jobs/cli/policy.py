"""tmp
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from governance.errors import ConfigError
from governance.judge.policy.base import DEFAULT_POLICY_PATH
from governance.judge.policy.evaluate import evaluate
from governance.judge.policy.loading import load_policy, policy_sha256
from governance.numbers import fmt
from jobs.cli.exits import EXIT_FAIL, EXIT_PASS, EXIT_WARN

if TYPE_CHECKING:

    pass



def add_cli(sub) -> None:
    """Register `persona-gov policy validate|evaluate`."""
    p = sub.add_parser(
        "policy", help="validate a policy file, or evaluate one on an audit directory",
        description="Policies are the risk team's thresholds (see policies/default.yaml).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = actions.add_parser(
        "validate", help="check policy files; exit 0 if all are valid, 2 otherwise",
        description="Check policy files: unknown keys, wrong types, out-of-range thresholds, "
                    "unknown components or categories and YAML errors are reported with the "
                    "field path and line. Exit 0 if every file is valid, 2 otherwise.",
        epilog="example: persona-gov policy validate policies/default.yaml",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=_cmd_validate)
    e = actions.add_parser(
        "evaluate", help="evaluate a policy on an audit directory",
        description="Evaluate a policy on an audit written by `persona-gov audit` (and a "
                    "baseline audit for the drift rules). Prints the verdict and findings.",
        epilog=f"exit codes: {EXIT_PASS} pass, {EXIT_FAIL} fail, {EXIT_WARN} warn, 2 bad input "
               "(invalid policy, incomplete audit directory), 4 unexpected error.\n"
               "example: persona-gov policy evaluate --audit out/new --baseline out/champion "
               "--out out/verdict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--audit", required=True, help="audit directory")
    e.add_argument("--baseline", help="baseline audit directory for the drift rules")
    e.add_argument("--policy", default=str(DEFAULT_POLICY_PATH),
                   help="policy YAML (default: policies/default.yaml)")
    e.add_argument("--drift-share", type=float, help="Evidently drift share from `drift`")
    e.add_argument("--model-name", help="registered model name for applies_to "
                                        "(default: from the audit's model source)")
    e.add_argument("--tag", action="append", metavar="KEY=VALUE", help="model tag (repeatable)")
    e.add_argument("--out", help="write findings.csv and verdict.json here")
    e.set_defaults(func=_cmd_evaluate)


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except ConfigError as exc:
            print(f"persona-gov policy validate: {exc}", file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: valid {policy.describe()}; sha256 {policy_sha256(policy)[:12]}")
    return 2 if bad else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from governance.audit.result import AuditResult

    policy = load_policy(args.policy)
    tags = None
    if args.tag:
        pairs = [t.partition("=") for t in args.tag]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ConfigError(f"--tag takes KEY=VALUE, got {args.tag}")
        tags = {key: value for key, _, value in pairs}
    verdict = evaluate(
        policy, AuditResult.load(args.audit),
        AuditResult.load(args.baseline) if args.baseline else None,
        args.drift_share, model_name=args.model_name, model_tags=tags,
    )
    print(verdict.summary + "\n")
    with pd.option_context("display.max_colwidth", 90, "display.width", 200):
        print(verdict.findings.to_string(index=False, float_format=fmt))
    if args.out:
        print(f"\nwrote {verdict.save(args.out)}/ (findings.csv, verdict.json)")
    return {"pass": EXIT_PASS, "warn": EXIT_WARN, "fail": EXIT_FAIL}[verdict.status]
