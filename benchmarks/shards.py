"""Benchmark: one audit against the same audit in N question shards, side by side in one run.

Runs `run_audit` once, then every shard with `run_shard` one after another in this process
(as N workers would, each on its own device), and merges them. Asserts that every table of
the merged audit equals the one-run audit exactly, then prints the one run's time, each
shard's time, the merge's time, and the speedup N workers would give (one run's time over
the slowest shard's plus the merge).

    python benchmarks/shards.py                         # tiny random llama, seconds
    python benchmarks/shards.py --model smollm2-135m-instruct --questions 8 --shards 4 \\
        --components mlp_out:identity attn_out:last     # the real small model on a CPU
"""

from __future__ import annotations

import argparse
import time

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    import torch

    from governance.audit.result import AuditResult
    from governance.audit.run import run_audit
    from governance.audit.shards import Shard, merge, run_shard
    from governance.audit.spec import AuditSpec, prepare
    from governance.models.loading import LoadedModel, load_model, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model source (default: a tiny random llama)")
    parser.add_argument("--questions", type=int, default=12, help="questions in the audit")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--components", nargs="+",
                        default=["mlp_out:identity", "attn_out:last", "head:all"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pairs = [("a Black person", "a White person"), ("a man", "a woman")]
    if args.model:
        loaded = load_model(resolve_model(args.model), device="cpu")
        spec = AuditSpec(questions="mmlu", n_questions=args.questions, pairs=pairs,
                         components=tuple(args.components), bootstrap=200)
        inputs = prepare(spec)
    else:
        from governance.models.tiny import tiny_model, tiny_questions, tiny_tokenizer

        tok = tiny_tokenizer()
        loaded = LoadedModel.from_model(tiny_model("llama", vocab_size=len(tok)), tok, "tiny")
        spec = AuditSpec(n_questions=args.questions, pairs=pairs,
                         components=tuple(args.components), bootstrap=200)
        inputs = prepare(spec, tiny_questions(args.questions))

    t0 = time.perf_counter()
    one = run_audit(loaded, spec, inputs=inputs, progress=False)
    one_s = time.perf_counter() - t0
    parts, shard_s = [], []
    for i in range(args.shards):
        t = time.perf_counter()
        parts.append(run_shard(loaded, spec, Shard(i, args.shards), inputs=inputs,
                               progress=False))
        shard_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    merged = merge(parts)
    merge_s = time.perf_counter() - t
    for name in AuditResult.TABLES:
        pd.testing.assert_frame_equal(getattr(merged, name), getattr(one, name),
                                      check_exact=True, obj=name)

    n_q = len(inputs.questions)
    print(f"{loaded.identity.get('source')}: {n_q} questions x {len(inputs.pairs)} pairs "
          f"(noise floor included), {len(one.scores) // len(inputs.pairs)} patches per pair")
    print(f"one run                {one_s:8.2f} s")
    for i, s in enumerate(shard_s):
        print(f"shard {i + 1}/{args.shards} ({len(parts[i].positions):3d} q)   {s:8.2f} s")
    print(f"merge                  {merge_s:8.2f} s")
    print(f"shards in sequence     {sum(shard_s) + merge_s:8.2f} s "
          f"({(sum(shard_s) + merge_s) / one_s:.2f}x one run)")
    print(f"{args.shards} workers in parallel  {max(shard_s) + merge_s:8.2f} s "
          f"(speedup {one_s / (max(shard_s) + merge_s):.2f}x)")
    print("every table of the merged audit equals the one run's exactly")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
