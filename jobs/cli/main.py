"""`persona-gov`: the command line over the same spec objects the library uses.

Examples:

    # audit a local model on 100 stratified MMLU questions, race pairs only
    persona-gov audit --model ./SmolLM2-135M-Instruct --questions mmlu.jsonl \\
        --categories race --out out/smollm2

    # one explicit pair, a few components, on the GPU
    persona-gov audit --model models:/my-llm@champion --questions mmlu.jsonl \\
        --pair "a Black person" "a White person" --components mlp_out:identity head:last \\
        --device cuda --out out/pair

Every command follows one table of exit codes (below, and `jobs/cli/exits.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from governance.errors import GovernanceError, Unavailable
from governance.redaction import redact, redacted_output
from jobs.cli.exits import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED, epilog
from jobs.console import configure

log = logging.getLogger("governance")
LOG_JSON_ENV = "PERSONA_AUDIT_LOG_JSON"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-gov",
        description="Persona-patching audits of language models, for governance.",
        epilog=(__doc__ or "") + "\n" + epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every third-party warning and progress bar "
                             "(hidden by default where expected: no model hub, no licence "
                             "file, sub-second downloads)")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help=f"log records as JSON lines (also: {LOG_JSON_ENV}=1), redacted "
                             "like every log record")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from jobs.cli import audit, demo, drift, mitigate, nightly, policy, webhook

    audit.add_cli(sub)
    policy.add_cli(sub)
    drift.add_cli(sub)
    mitigate.add_cli(sub)
    nightly.add_nightly(sub)
    nightly.add_gate(sub)
    nightly.add_schedule(sub)
    webhook.add_cli(sub)
    demo.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # credentials never reach the terminal: every log record, and everything written to
    # stdout and stderr (ours, and what libraries print themselves), is redacted
    with redacted_output():
        args = build_parser().parse_args(argv)
        as_json = args.log_json or os.environ.get(LOG_JSON_ENV, "").lower() in (
            "1", "true", "yes")
        configure(verbose=args.verbose, as_json=as_json)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except Unavailable as exc:
        print(f"persona-gov {args.command}: error: {redact(exc)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except GovernanceError as exc:
        print(f"persona-gov {args.command}: error: {redact(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"persona-gov {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(f"persona-gov {args.command}: unexpected error (traceback above)", file=sys.stderr)
        return EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
