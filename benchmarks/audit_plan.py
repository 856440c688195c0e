"""The audit under a budget, timed through the public API (`run_audit`), beside the same
audit with a fixed `exact_top_k` and (optionally) the all-exact audit, in one process.

Prints what the plan chose (k per sweep), the FLOPs it verified exactly and the fraction of
the matmul rate the device sustained while it did; with `--all-exact`, recall@10 of the
plan's top components against the all-exact audit's, per sweep (exit 1 below 0.9), and with
`--engine-time` the engine's own time on the audit's prompts beside the audit's patching.

    OMP_NUM_THREADS=1 python benchmarks/audit_plan.py --model smollm2-135m-instruct \\
        --n-questions 2 --pairs 1 --budget-minutes 3.5 --all-exact   # a 2-core CPU
    python benchmarks/audit_plan.py --shape llama-3-8b --tokenizer TOKENIZER_DIR \\
        --device cuda --dtype bfloat16 --n-questions 40 --pairs 10 --budget-minutes 2 \\
        --compare-top-k 32 --compare-questions 4 --profile       # one H200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.patching import SHAPES, matmul_peak, sync  # noqa: E402
from governance.audit.run import run_audit  # noqa: E402
from governance.audit.spec import AuditSpec  # noqa: E402
from governance.inputs.personas import load_catalogue  # noqa: E402
from governance.models.loading import LoadedModel  # noqa: E402


def build(args) -> LoadedModel:
    """The model: a random-weight shape from `benchmarks/patching.py`, or any model source."""
    if not args.shape:
        from governance.models.loading import load_model, resolve_model

        return load_model(resolve_model(args.model), device=args.device, dtype=args.dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from governance.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**SHAPES[args.shape]), dtype=getattr(torch, args.dtype),
            attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else tiny_tokenizer()
    return LoadedModel.from_model(model, tok, f"random {args.shape}")


def persona_pairs(n: int) -> list[tuple[str, str]]:
    """The first `n` persona pairs of the default catalogue (the noise floor is added)."""
    pairs = load_catalogue().pairs_for(None, noise_floor=False)
    return [(p.clean.phrase, p.corrupt.phrase) for p in pairs][:n]


def timed_audit(loaded, spec, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    result = run_audit(loaded, spec, progress=False)
    sync(device)
    return time.perf_counter() - t, result


def top_sets(scores: pd.DataFrame, k: int) -> dict[tuple[str, str], set]:
    """Per (sweep, pair), the k patches with the largest |S|."""
    out = {}
    for (comp, pos, clean, corrupt), g in scores.groupby(
            ["component", "positions", "clean_persona", "corrupt_persona"]):
        g = g.assign(size=g["score"].abs()).nlargest(k, "size")
        out[(f"{comp}:{pos}", f"{clean} -> {corrupt}")] = set(
            zip(g["layer"], g["head"].fillna(-1), strict=True))
    return out


def recall_table(plan_scores: pd.DataFrame, exact_scores: pd.DataFrame, k: int) -> pd.DataFrame:
    ours, truth = top_sets(plan_scores, k), top_sets(exact_scores, k)
    rows = [{"sweep": s, "pair": p, f"recall@{k}": len(ours.get((s, p), set()) & t) / len(t)}
            for (s, p), t in truth.items()]
    return (pd.DataFrame(rows).groupby("sweep")[f"recall@{k}"]
            .agg(["mean", "min", "count"]).reset_index())


def _items(result, by_pair, prompts=None):
    from governance.patching.packed import Item

    return [Item(p["clean_ids"], p["corrupt_ids"], p["identity_positions"],
                 by_pair[(p["clean_persona"], p["corrupt_persona"])])
            for p in (result.prompts if prompts is None else prompts)]


def engine_time(loaded, result) -> tuple[float, int]:
    """The engine alone on the audit's own prompts and patches (as benchmarks/patching.py
    times it), with every pair's patches the audit ran, through `run_many` as the audit
    calls it."""
    from governance.patching.engine import PatchingEngine

    engine = PatchingEngine(loaded.model, loaded.anatomy)
    items = _items(result, chosen_by_pair(result.scores))
    options = result.prompts[0]["option_ids"]
    for r in engine.run_many(items[:1], options):  # warm-up, as the audit's calibration is
        r.patched.cpu()
    sync(loaded.device)
    t = time.perf_counter()
    for r in engine.run_many(items, options):
        r.patched.cpu()
    return time.perf_counter() - t, len(items)


def chosen_by_pair(scores: pd.DataFrame) -> dict[tuple[str, str], list]:
    from governance.patching.engine import Patch

    out: dict[tuple[str, str], list] = {}
    for r in scores.itertuples():
        head = None if pd.isna(r.head) else int(r.head)
        out.setdefault((r.clean_persona, r.corrupt_persona), []).append(
            Patch(r.component, int(r.layer), r.positions, head))
    return out


def profile_question(loaded, result, device) -> None:
    """Where the exact patching of 16 prompt pairs spends its time (`run_many`, as the
    audit runs it): wall time with the results read back, the host's time to queue them,
    and the profiler's top operators by host and by device time."""
    from torch.profiler import ProfilerActivity, profile

    from governance.patching.engine import PatchingEngine

    engine = PatchingEngine(loaded.model, loaded.anatomy)
    items = _items(result, chosen_by_pair(result.scores), result.prompts[:16])
    options = result.prompts[0]["option_ids"]

    def queue():
        return list(engine.run_many(items, options))

    [r.patched.cpu() for r in queue()]  # warm-up
    sync(device)
    t = time.perf_counter()
    runs = queue()
    queued = time.perf_counter() - t
    [r.patched.cpu() for r in runs]
    total = time.perf_counter() - t
    rows = np.mean([len(it.patches) for it in items])
    n = len(items)
    print(f"\nprofile: {n} prompt pairs, {rows:.0f} rows each: {total / n * 1e3:.1f} ms a "
          f"prompt pair with results read back (the host took {queued / n * 1e3:.1f} ms a "
          f"prompt pair to queue them; packed batches: {engine.packed is not None})")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        [r.patched.cpu() for r in queue()]
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=12))
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of a shape")
    parser.add_argument("--tokenizer", help="tokenizer directory for --shape (default: the "
                        "tiny test tokenizer)")
    parser.add_argument("--questions", default="mmlu", help="question file or asset")
    parser.add_argument("--n-questions", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=1, help="persona pairs (plus the floor)")
    parser.add_argument("--budget-minutes", type=float, required=True)
    parser.add_argument("--compare-top-k", type=int, help="also time exact_top_k at this k")
    parser.add_argument("--compare-questions", type=int, default=8,
                        help="questions of the exact_top_k run (its time is scaled linearly)")
    parser.add_argument("--all-exact", action="store_true",
                        help="also run every patch exactly; print recall@10 per sweep and the "
                        "engine's time on the audit's prompts beside the audit's")
    parser.add_argument("--all-exact-dir", type=Path,
                        help="with --all-exact: the all-exact audit's stored result; run and "
                        "saved there if absent, reused if present (same prompts required)")
    parser.add_argument("--engine-time", action="store_true",
                        help="with --all-exact: also time the engine alone on the all-exact "
                        "audit's prompts and patches")
    parser.add_argument("--profile", action="store_true",
                        help="profile the exact patching of the plan's chosen patches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    t = time.perf_counter()
    loaded = build(args)
    print(f"model {args.shape or args.model}: {loaded.anatomy.n_layers} layers x "
          f"{loaded.anatomy.n_heads} heads, {args.dtype} on {device}, built in "
          f"{time.perf_counter() - t:.1f} s; torch {torch.__version__}")
    base = AuditSpec(questions=args.questions, n_questions=args.n_questions,
                     pairs=persona_pairs(args.pairs), attention=False, bootstrap=0,
                     screen="atp")
    planned = base.model_copy(update={"budget_minutes": args.budget_minutes})
    seconds, result = timed_audit(loaded, planned, device)
    plan = result.meta["plan"]
    n_prompts = len(result.prompts)
    timings = result.meta["timings_s"]
    print(f"\nplanned audit (budget_minutes {args.budget_minutes}): {n_prompts} prompt pairs "
          f"({args.n_questions} questions x {n_prompts // args.n_questions} pairs), "
          f"{seconds:.1f} s in all; patching {timings['patching']:.1f} s "
          f"({timings['patching'] / n_prompts:.3f} s a prompt pair)")
    print(f"  budget {args.budget_minutes * 60:.0f} s for the whole audit: the audit took "
          f"{seconds:.1f} s ({'within' if seconds <= args.budget_minutes * 60 else 'OVER'} "
          f"the budget); persona pass estimated {plan['reserved_s']:.1f} s beforehand, took "
          f"{timings['behaviour_attention']:.1f} s")
    print(f"  calibration {plan['calibration']}; screen {plan['screen_s']:.1f} s")
    print(f"  k per sweep {plan['k']} (first pass {plan['k_first_pass']}, widened "
          f"{plan['widened']}) of {plan['sweep_sizes']}")
    print(f"  exact: {plan['exact_patches']} patch-pairs per question, "
          f"{plan['skipped_patches']} estimated only; estimated {plan['estimated_exact_s']:.1f} s,"
          f" took {plan['actual_exact_s']:.1f} s; over budget: {plan['over_budget']}")
    print(f"  screen agreement on what was verified: {plan['agreement']}")
    peak = matmul_peak(device, getattr(torch, args.dtype), min(plan["actual_exact_s"], 5.0))
    rate = plan["exact_flops"] / plan["actual_exact_s"]
    print(f"  exact FLOPs {plan['exact_flops'] / 1e15:.2f} PFLOP, {rate / 1e12:.1f} TFLOP/s = "
          f"{rate / peak:.1%} of the {args.dtype} matmul rate sustained here "
          f"({peak / 1e12:.1f} TFLOP/s)")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")

    if args.profile:
        profile_question(loaded, result, device)

    if args.compare_top_k:
        fixed = base.model_copy(update={"exact_top_k": args.compare_top_k,
                                        "n_questions": args.compare_questions})
        s_fixed, r_fixed = timed_audit(loaded, fixed, device)
        per = r_fixed.meta["timings_s"]["patching"] / len(r_fixed.prompts)
        print(f"\nexact_top_k {args.compare_top_k} on {args.compare_questions} questions: "
              f"patching {r_fixed.meta['timings_s']['patching']:.1f} s ({per:.3f} s a prompt "
              f"pair); scaled linearly to {n_prompts} prompt pairs: {per * n_prompts:.0f} s "
              f"= {per * n_prompts / 60:.1f} min, against the plan's "
              f"{timings['patching'] / 60:.1f} min")
        if args.profile:
            profile_question(loaded, r_fixed, device)

    if args.all_exact:
        exact_spec = base.model_copy(update={"screen": "off"})
        stored = args.all_exact_dir
        if stored is not None and (stored / "audit.json").exists():
            from governance.audit.result import AuditResult

            r_exact = AuditResult.load(stored)
            if [p["corrupt_ids"] for p in r_exact.prompts] != [
                    p["corrupt_ids"] for p in result.prompts]:
                print(f"{stored} holds an audit of other prompts")
                return 1
            s_exact = r_exact.meta["timings_s"]["total"]
            print(f"\nall-exact audit read from {stored}")
        else:
            s_exact, r_exact = timed_audit(loaded, exact_spec, device)
            if stored is not None:
                r_exact.save(stored)
        p_exact = r_exact.meta["timings_s"]["patching"]
        print(f"\nall-exact audit: {s_exact:.1f} s in all, patching {p_exact:.1f} s "
              f"({p_exact / len(r_exact.prompts):.2f} s a prompt pair); the plan's patching "
              f"{timings['patching']:.1f} s = {timings['patching'] / p_exact:.2f}x of it")
        table = recall_table(result.scores, r_exact.scores, 10)
        print("recall@10 of the plan's top components (by exact |S|) against the all-exact "
              "audit's, per sweep over pairs:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        if args.engine_time:
            t_engine, n = engine_time(loaded, r_exact)
            print(f"\nengine alone on the all-exact audit's {n} prompt pairs and patches: "
                  f"{t_engine:.1f} s ({t_engine / n:.2f} s a prompt pair); the audit's "
                  f"patching stage took {p_exact / t_engine:.2f}x the engine's time")
        if (table["min"] < 0.9).any():
            print("FAIL: recall@10 below 0.9 in a sweep")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
