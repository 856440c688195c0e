"""`persona-gov webhook`: argparse registration (imports nothing heavy)."""

from __future__ import annotations

import argparse
from typing import Any

_CONFIG_HELP = ("nightly config YAML: the `webhook` section and the lease database, which "
                "holds the queue (default: $PERSONA_AUDIT_CONFIG, else defaults)")


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "webhook",
        help="receive MLflow model-registry webhooks and queue audits of the versions they name",
        description=(
            "An HTTP receiver for MLflow's registry webhooks (model_version.created, "
            "model_version_alias.created, model_version_tag.set). Each delivery's HMAC "
            "signature (X-MLflow-Signature) is checked with the secret in "
            "PERSONA_AUDIT_WEBHOOK_SECRET (never read from the config file); unsigned, "
            "wrongly signed, replayed and stale deliveries are refused. An accepted "
            "delivery becomes a row of table persona_audit_queue in the lease database, "
            "which the nightly drains (`persona-gov nightly --once --queue`, or the "
            "scheduler's queue job). Serves GET /healthz and GET /metrics too. "
            "SIGTERM/SIGINT stop it."
        ),
        epilog=(
            "register it with MLflow (the server needs MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https "
            "and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true to post to a loopback http URL):\n"
            "  MlflowClient().create_webhook(name='persona-audit', "
            "url='http://127.0.0.1:8080/webhook',\n"
            "      events=['model_version.created', 'model_version_alias.created', "
            "'model_version_tag.set'], secret=SECRET)\n"
            "example:\n  PERSONA_AUDIT_WEBHOOK_SECRET=... persona-gov webhook --config "
            "nightly.yaml --port 8080"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--host", help="listen address (default: webhook.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: webhook.port, 8080)")
    p.set_defaults(func=_cmd_webhook)


def _cmd_webhook(args: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.webhook import run_webhook

    return run_webhook(load_config(args.config), host=args.host, port=args.port)
