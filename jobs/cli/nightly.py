"""`persona-gov nightly | gate | schedule`: argparse registration (imports nothing heavy)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from jobs.cli.exits import EXIT_INTERRUPTED

log = logging.getLogger("jobs")

_CONFIG_HELP = ("nightly config YAML (default: $PERSONA_AUDIT_CONFIG, else defaults; env "
                "MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI and PERSONA_AUDIT_* override it)")


def add_nightly(sub: Any) -> None:
    p = sub.add_parser(
        "nightly",
        help="audit every selected registered model version that needs it, log to MLflow",
        description=(
            "One pass over the registered model versions the config selects: each version "
            "without a completed audit for the current spec + policy + toolkit version is "
            "audited in its own MLflow run (experiment 'persona-audits' by default), judged "
            "by the policy, and its approval record written (persona_audit.* tags, a line "
            "appended to the description). Versions queued by the registry's webhooks "
            "(`persona-gov webhook`) are handled first, through the same leases; a queued "
            "version the config does not select is recorded as skipped, never audited. "
            "Without --once, runs the schedule (= `schedule`)."
        ),
        epilog=(
            "exit codes: 0 every selected version has a completed audit (pass, warn or fail), "
            "2 bad config, 4 a version errored (its run and tags say why) or the tracking "
            "server is unreachable, 130 interrupted.\n"
            "examples:\n  persona-gov nightly --once --config jobs/nightly.example.yaml\n"
            "  persona-gov nightly --once --queue --config nightly.yaml   # the queue only\n"
            "  persona-gov nightly --once --model my-llm --force\n"
            "  persona-gov nightly --once --executor ray --ray-address auto   # on Ray"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--once", action="store_true", help="run one pass now and exit")
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--model", nargs="+", metavar="NAME",
                   help="only these registered models (their config selector, else "
                        "`default_versions`)")
    p.add_argument("--force", action="store_true",
                   help="audit again even where a completed audit exists")
    p.add_argument("--queue", action="store_true",
                   help="only the versions queued by the registry's webhooks (table "
                        "persona_audit_queue in the lease database), then exit")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where audits run (default: the config's `executor`, local): ray runs "
                        "one task per (version, question shard) on a Ray cluster and merges "
                        "them here; needs the `ray` extra")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join (e.g. auto, ray://head:10001; default: the "
                        "config's ray.address, else a local Ray instance)")
    p.set_defaults(func=_cmd_nightly)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def _cmd_nightly(args: argparse.Namespace) -> int:
    from governance.errors import ConfigError
    from jobs.config import load_config

    if args.queue and (args.model or args.force or not args.once):
        raise ConfigError("--queue drains the queue once: it takes --once, and neither "
                          "--model nor --force")
    if (args.executor or args.ray_address) and not args.once:
        raise ConfigError("--executor and --ray-address apply to one pass (--once); the "
                          "schedule reads `executor:` and `ray:` from the config file")
    config = load_config(args.config, executor=args.executor,
                         **{"ray.address": args.ray_address})
    if not args.once:
        from jobs.scheduler import run_scheduler

        return run_scheduler(config)
    from jobs.nightly import run_pass

    # SIGTERM like Ctrl-C: the version in progress is recorded as error, its lease released
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_pass(config, models=args.model, force=args.force,
                          queue="only" if args.queue else "first")
    except KeyboardInterrupt as exc:
        print(f"persona-gov nightly: interrupted ({exc or 'SIGINT'}): the version in "
              "progress is recorded as error", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{report.headline()}\n\n{report.table()}")
    return report.exit_code


def add_gate(sub: Any) -> None:
    p = sub.add_parser(
        "gate",
        help="exit 0 only if a model version's latest completed audit passed (for CI/CD)",
        description=(
            "Judge one registered model version by its latest completed audit under the "
            "current policy, and print why."
        ),
        epilog=(
            "exit codes: 0 pass (or warn with --warn-passes); 1 fail; 3 warn while "
            "gate.warn_fails is true (default); 2 no valid audit (unknown version/alias, never "
            "audited, or audited only under another policy); 4 tracking server unreachable.\n"
            "example: persona-gov gate --model my-llm --alias champion --config nightly.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registered model name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="model version number")
    which.add_argument("--alias", help="model version alias, e.g. champion")
    p.add_argument("--config", help=_CONFIG_HELP)
    warn = p.add_mutually_exclusive_group()
    warn.add_argument("--warn-fails", dest="warn_fails", action="store_true", default=None,
                      help="a warn verdict fails the gate (exit 3)")
    warn.add_argument("--warn-passes", dest="warn_fails", action="store_false",
                      help="a warn verdict passes the gate (exit 0)")
    p.set_defaults(func=_cmd_gate)


def _cmd_gate(args: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.gate import gate

    result = gate(load_config(args.config), args.model, version=args.version,
                  alias=args.alias, warn_fails=args.warn_fails)
    print(result.reason, file=sys.stdout if result.code == 0 else sys.stderr)
    return result.code


def add_schedule(sub: Any) -> None:
    p = sub.add_parser(
        "schedule",
        help="run the nightly pass on a cron schedule (APScheduler, state kept in a database)",
        description=(
            "Run one blocking APScheduler scheduler whose job (the nightly pass with this "
            "config) comes from the config; its next and last fire times are kept as plain "
            "rows in the job-store database (SQLite beside the tracking store by default; set "
            "schedule.jobstore_url for another database). The schedule survives "
            "restarts; a run missed while stopped still happens within "
            "schedule.misfire_grace_time_s. SIGTERM/SIGINT stop it cleanly."
        ),
        epilog='example: persona-gov schedule --config nightly.yaml --cron "0 2 * * *" '
               "--timezone Europe/Paris",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--cron", help='5-field crontab line (default: schedule.cron, "0 2 * * *")')
    p.add_argument("--timezone", help="IANA time zone (default: schedule.timezone, UTC)")
    p.set_defaults(func=_cmd_schedule)


def _cmd_schedule(args: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.scheduler import run_scheduler

    return run_scheduler(load_config(args.config), cron=args.cron, timezone=args.timezone)
