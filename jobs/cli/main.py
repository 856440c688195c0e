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
import sys
import traceback

from governance.errors import GovernanceError, Unavailable
from governance.redaction import install_redaction, redact, redacted_output
from jobs.cli.exits import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED, epilog

log = logging.getLogger("governance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-gov",
        description="Persona-patching audits of language models, for governance.",
        epilog=(__doc__ or "") + "\n" + epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from jobs.cli import audit, demo, drift, nightly, policy

    audit.add_cli(sub)
    policy.add_cli(sub)
    drift.add_cli(sub)
    nightly.add_nightly(sub)
    nightly.add_gate(sub)
    nightly.add_schedule(sub)
    demo.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # credentials never reach the terminal: every log record, and everything written to
    # stdout and stderr (ours, and what libraries print themselves), is redacted
    with redacted_output():
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("urllib3", "filelock", "httpx", "great_expectations", "alembic",
                      "mlflow.system_metrics", "mlflow.transformers", "mlflow.store"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        install_redaction()
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
