"""`persona-gov`: the command line over the same spec objects the library uses.

Examples:

    # audit a local model on 100 stratified MMLU questions, race pairs only
    persona-gov audit --model ./SmolLM2-135M-Instruct --questions mmlu.jsonl \\
        --categories race --out out/smollm2

    # one explicit pair, a few components, on the GPU
    persona-gov audit --model models:/my-llm@champion --questions mmlu.jsonl \\
        --pair "a Black person" "a White person" --components mlp_out:identity head:last \\
        --device cuda --out out/pair

Exit codes: 0 success, 2 bad input (the message says what and where), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from governance.errors import GovernanceError

log = logging.getLogger("governance")


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="run a persona-patching audit on one model and write its tables",
        description=(
            "Run the persona-patching audit (method.md) on one model: behaviour per persona, "
            "restoration scores per component/layer/head, attention to identity. Writes "
            "scores.csv, attention.csv, behaviour.csv, pairs.csv, audit.json and prompts.jsonl "
            "to --out. Needs no MLflow server."
        ),
        epilog=(
            "example: persona-gov audit --model ./model_dir --questions mmlu.jsonl "
            "--n-questions 20 --categories race gender --out out/audit"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="HF model directory, .gguf file, MLflow URI (models:/name/1, "
                        "models:/name@alias, runs:/id/path), or the pinned asset "
                        "'smollm2-135m-instruct'")
    p.add_argument("--questions",
                   help="question file (JSONL/JSON/Parquet/CSV), MMLU CSV dir, or the pinned "
                        "asset 'mmlu' (14,042 MMLU test questions)")
    p.add_argument("--spec", help="audit spec YAML; options given here override it")
    p.add_argument("--personas", help="persona catalogue YAML (default: the packaged one)")
    p.add_argument("--categories", nargs="+", metavar="CATEGORY",
                   help="persona categories to audit (default: all)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("CLEAN", "CORRUPT"),
                   help="an explicit persona pair (repeatable); replaces the catalogue's pairs")
    p.add_argument("--n-questions", type=int, help="stratified sample size (default 100)")
    p.add_argument("--seed", type=int, help="sampling and bootstrap seed (default 0)")
    p.add_argument("--components", nargs="+", metavar="COMPONENT:POSITIONS",
                   help="e.g. resid_pre:identity mlp_out:all head:last (default: method.md's "
                        "table)")
    p.add_argument("--layers", nargs="+", type=int, help="layers to patch (default: all)")
    p.add_argument("--alignment", choices=["pad", "refuse"],
                   help="persona phrases of different token length: pad with a filler token "
                        "(default) or refuse the pair")
    p.add_argument("--no-attention", action="store_true", help="skip attention to identity")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, "
                                   "bf16 on CUDA)")
    p.add_argument("--chunk-rows", type=int,
                   help="patched prompts per forward; lower it to save memory (default: 32 "
                        "on a CPU, on a GPU as many as fit a quarter of its free memory)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model directory (off by default)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from governance.assets import resolve
    from governance.audit import AuditSpec, run_audit
    from governance.models import load_model

    spec = AuditSpec.from_yaml(args.spec) if args.spec else AuditSpec()
    spec = spec.with_overrides(
        questions=resolve(args.questions, "questions") if args.questions else None,
        personas=args.personas,
        categories=args.categories,
        pairs=[tuple(p) for p in args.pair] if args.pair else None,
        n_questions=args.n_questions,
        seed=args.seed,
        components=tuple(args.components) if args.components else None,
        layers=tuple(args.layers) if args.layers else None,
        alignment=args.alignment,
        attention=False if args.no_attention else None,
    )
    log.info("loading model %s", args.model)
    loaded = load_model(resolve(args.model, "gguf"), device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    result = run_audit(loaded, spec, chunk_rows=args.chunk_rows, progress=not args.no_progress)
    out = _replace_dir(Path(args.out), result.save)
    print(summarise(result))
    print(f"\nwrote {out}/ (scores.csv, attention.csv, behaviour.csv, pairs.csv, audit.json, "
          "prompts.jsonl)")
    return 0


def _replace_dir(out: Path, write) -> Path:
    """Write into a sibling temp dir, then swap it in: a failed write leaves `out` intact."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def summarise(result) -> str:
    """A few readable lines: behaviour, the strongest components, top heads, noise floor."""
    lines = [f"model {result.meta['model'].get('source')}  spec {result.meta['spec_sha256'][:12]}"]
    b = result.behaviour
    lines.append("\naccuracy per persona (95% CI):")
    for r in b.itertuples():
        lines.append(f"  {r.persona:<32} {r.accuracy:6.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]  "
                     f"flip vs none {r.flip_rate:.3f}")
    curves = result.layer_curves()
    if not curves.empty:
        lines.append("\nstrongest layer per component (mean restoration score over pairs):")
        best = curves.loc[curves.groupby(["component", "positions"])["score"].idxmax()]
        for r in best.itertuples():
            lines.append(f"  {r.component + ':' + r.positions:<20} layer {r.layer:>3}  "
                         f"score {r.score:+.3f}  ({r.category})")
    for positions in ("all", "last"):
        heads = result.top_heads(5, positions)
        if not heads.empty:
            lines.append(f"\ntop heads (positions={positions}):")
            for r in heads.itertuples():
                lines.append(f"  L{r.layer}.H{r.head:<3} {r.category:<12} score {r.score:+.3f}")
    lines.append("\n" + result.meta.get("noise_floor", ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-gov",
        description="Persona-patching audits of language models, for governance.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from governance import demo, drift, policy
    from jobs import cli as jobs_cli

    _add_audit(sub)
    policy.add_cli(sub)
    drift.add_cli(sub)
    jobs_cli.add_nightly(sub)
    jobs_cli.add_gate(sub)
    jobs_cli.add_schedule(sub)
    demo.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "filelock", "httpx", "great_expectations", "alembic",
                  "mlflow.system_metrics", "mlflow.transformers", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except GovernanceError as exc:
        print(f"persona-gov {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
