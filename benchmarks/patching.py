"""Benchmark: the engine against a TransformerLens-style loop and TransformerLens itself,
side by side in one run.

Same model, same prompts, same patches. The baseline is the loop TransformerLens's
patching helpers run: the clean activations cached once, then one full forward per patch
with a hook, full logits at every position, and a device sync per patch. The script asserts
that both give the same restoration scores, then prints the speedup, the FLOPs the engine
spent, the fraction of the measured matmul peak, peak memory, and the AtP screen's speed and
agreement with exact patching. Where TransformerLens is installed (a dev dependency), it
also times TransformerLens's own per-head sweep, `get_act_patch_attn_head_out_all_pos`, on
the same weights against the engine's head sweep and checks that they agree.

In float32 the engine must agree with the loop and with TransformerLens directly. In bfloat16
or float16 two computations of the same patches round differently, so each one (the engine,
the loop, TransformerLens) is compared with a float32 reference instead: the engine on the
same weights cast to float32, the same prompts and the same patches. The run fails when the
engine is further from it than the loop or TransformerLens (up to a slack it prints).

    # CPU, the real small model, 4 MMLU prompt pairs (about 35 minutes on 2 cores,
    # most of it the TransformerLens-style loop and TransformerLens)
    python benchmarks/patching.py --model smollm2-135m-instruct --pairs 4

    # one GPU, Llama-3.2-1B shape with random weights, bf16
    python benchmarks/patching.py --shape llama-3.2-1b --pairs 64 --tokens 160 \\
        --device cuda --dtype bfloat16 --sweeps head:all --parity-dtype float32
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from governance.audit.spec import DEFAULT_COMPONENTS
from governance.models.architectures import Anatomy, anatomy_of
from governance.patching.attribution import agreement, atp_screen, screen_scores
from governance.patching.engine import (
    Patch,
    PatchingEngine,
    patch_begins,
    position_masks,
    sweep,
)
from governance.patching.scores import restoration
from governance.patching.sites import Site, capture, hooked

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=256),  # a smoke test of the script itself
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                         tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
}
DEFAULT_SWEEPS = DEFAULT_COMPONENTS  # the audit's default: docs/method.md's table
LOW_PRECISION = ("bfloat16", "float16")  # checked against REFERENCE_DTYPE, not directly
REFERENCE_DTYPE = "float32"


@dataclass
class Prompt:
    clean: list[int]
    corrupt: list[int]
    identity: list[int]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(args) -> tuple[torch.nn.Module, Anatomy, list[Prompt], list[int]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[args.shape])
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation="sdpa")
        model.eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        prompts = []
        for _ in range(args.pairs):
            ids = torch.randint(100, config.vocab_size, (args.tokens,), generator=gen).tolist()
            other = list(ids)
            identity = [5, 6, 7]
            for p in identity:
                other[p] = (other[p] + 1 + p) % config.vocab_size
            prompts.append(Prompt(ids, other, identity))
        return model, anatomy_of(model), prompts, [o % config.vocab_size
                                                   for o in (330, 389, 340, 422)]
    from governance.inputs.assets import resolve
    from governance.inputs.personas import load_catalogue
    from governance.inputs.prompts import PromptBuilder, PromptFormat
    from governance.inputs.questions import load_questions, sample_questions
    from governance.models.loading import load_model, resolve_model

    loaded = load_model(resolve_model(args.model), device=args.device, dtype=args.dtype)
    builder = PromptBuilder(loaded.tokenizer, PromptFormat(load_catalogue().instruction()))
    questions = sample_questions(load_questions(resolve("mmlu", "questions")), 200, 0)
    questions = sorted(questions, key=lambda q: len(q.question) + sum(map(len, q.options)))
    prompts = []
    args.audit_inputs = (loaded, questions[len(questions) // 2:][: args.pairs])
    for q in args.audit_inputs[1]:  # mid-length questions
        ap = builder.pair("a Black person", "a White person", q)
        prompts.append(Prompt(list(ap.clean_ids), list(ap.corrupt_ids), list(ap.identity)))
    return loaded.model, loaded.anatomy, prompts, list(builder.option_ids())


def tl_style_loop(model, anatomy, prompts: list[Prompt], patches: list[Patch], options,
                  device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Option logits per patch the way TransformerLens's patching helpers compute them: the
    prompts (of one length, with the same identity positions) form one batch, and every
    patch is one full forward of that batch with full logits and a sync."""
    clean = torch.tensor([p.clean for p in prompts], device=device)
    corrupt = torch.tensor([p.corrupt for p in prompts], device=device)
    identity = prompts[0].identity
    sites = sorted({p.site for p in patches})
    with torch.inference_mode():
        acts, clean_logits = capture(model, anatomy, sites, clean)
        corrupt_logits = model(input_ids=corrupt, use_cache=False).logits[:, -1]
        rows = []
        length = clean.shape[1]
        for patch in patches:
            where = {"all": list(range(length)), "last": [length - 1],
                     "identity": identity}[patch.positions]
            clean_act = acts[patch.site]

            def edit(x, clean_act=clean_act, where=where, head=patch.head):
                x = x.clone()
                if head is None:
                    x[:, where] = clean_act[:, where]
                else:
                    x[:, where, head] = clean_act[:, where, head]
                return x

            with hooked(model, anatomy, {Site(patch.component, patch.layer): edit}):
                logits = model(input_ids=corrupt, use_cache=False).logits  # every position
            rows.append(logits[:, -1, options].float().cpu())  # a sync per patch
    patched = torch.stack(rows, dim=1)  # (prompt, patch, option)
    return [(patched[i], clean_logits[i, options].float().cpu(),
             corrupt_logits[i, options].float().cpu()) for i in range(len(prompts))]


def baseline(model, anatomy, prompts, patches, options, device):
    """The TL-style loop, batching prompts that share a length and identity positions."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(p.clean), tuple(p.identity)), []).append(i)
    out: list = [None] * len(prompts)
    for members in groups.values():
        for i, r in zip(members, tl_style_loop(model, anatomy, [prompts[i] for i in members],
                                               patches, options, device), strict=True):
            out[i] = r
    return out


def transformer_lens_heads(model, prompts: list[Prompt], options, device):
    """TransformerLens's own per-head sweep (`governance.patching.peers`) with the logit
    difference of the first two options at the last position as its metric: seconds, the
    prompt groups (one batch per prompt length, as its helper needs) and the metric per
    (group, layer, head). None where TransformerLens is not installed."""
    try:
        from governance.patching.peers import head_sweep, to_transformer_lens

        tl = to_transformer_lens(model)
    except ImportError:
        return None
    a, b = options[:2]

    def logit_diff(logits):  # in float32, as the engine's option logits are subtracted
        return (logits[:, -1, a].float() - logits[:, -1, b].float()).mean()

    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.clean), []).append(i)
    out = []
    sync(device)
    t = time.perf_counter()
    for members in groups.values():
        clean = torch.tensor([prompts[i].clean for i in members], device=device)
        corrupt = torch.tensor([prompts[i].corrupt for i in members], device=device)
        out.append(head_sweep(tl, clean, corrupt, logit_diff).cpu())
    sync(device)
    seconds = time.perf_counter() - t
    del tl
    return seconds, list(groups.values()), out


def layer_flops(anatomy: Anatomy, config, q_tokens: int, k_tokens: int,
                kv_tokens: int | None = None) -> float:
    """Matmul FLOPs of one decoder layer: queries, o_proj and MLP for q_tokens, attention of
    those over k_tokens keys, key/value projections for kv_tokens (default q_tokens)."""
    d, dq = anatomy.d_model, anatomy.n_heads * anatomy.head_dim
    dkv = anatomy.n_kv_heads * anatomy.head_dim
    ff = getattr(config, "intermediate_size", None) or 4 * d
    mlp = 2 * 3 * d * ff if hasattr(config, "intermediate_size") else 2 * 2 * d * ff
    per_query = 2 * d * dq * 2 + mlp + 2 * 2 * k_tokens * dq
    kv = 2 * d * 2 * dkv
    return q_tokens * per_query + (q_tokens if kv_tokens is None else kv_tokens) * kv


def engine_flops(anatomy, config, prompts, patches, fused: bool) -> float:
    """FLOPs the engine's exact strategies need. Fused: the clean and corrupted runs, then
    each row resumed at its layer on the positions from its `patch_begin` on (attending to
    every earlier key), the final layer past its keys and values at the last position only.
    Hooked: the clean/corrupt/prefix forwards, rows resumed at their layer on every position,
    last-position rows recomputing one token."""
    L = anatomy.n_layers
    total = 0.0
    for p in prompts:
        t = len(p.clean)
        full_layer = layer_flops(anatomy, config, t, t)
        if fused:
            begins = patch_begins(position_masks(t, p.identity), p.clean, p.corrupt)
            total += 2 * L * full_layer
            for patch in patches:
                q = t - begins[patch.positions]
                total += ((L - 1 - patch.layer) * layer_flops(anatomy, config, q, t, q)
                          + layer_flops(anatomy, config, 1, t, kv_tokens=q))
            continue
        has_last = any(patch.positions == "last" for patch in patches)
        total += (3 if has_last else 2) * L * full_layer  # clean, corrupt (, prefix KV cache)
        for patch in patches:
            if patch.positions == "last":
                total += L * layer_flops(anatomy, config, 1, t)
            else:
                total += (L - patch.layer) * full_layer
    return total


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of back-to-back square matmuls kept up for `seconds`: a GPU at its power limit
    clocks down within a second or two, so a short burst overstates what a sweep of several
    seconds can reach (an H200 here: ~790 TFLOP/s for 0.2 s, ~660 sustained)."""
    # on a CPU one matmul at a time: a 1024^3 bfloat16 product without native support takes
    # seconds there, and ten between clock checks would overrun `seconds` many times over
    n, burst = (8192, 10) if device.type == "cuda" else (512, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(burst):
            a @ b
        sync(device)
        done += burst
    return 2 * n**3 * done / (time.perf_counter() - t)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def time_engine(engine, prompts, patches, options, device, warmup: float = 0.0):
    """Seconds for every prompt through `engine`, and its (patched, clean, corrupt) per prompt.
    Untimed first: one prompt (which also compiles the fused kernels), then more until
    `warmup` seconds have passed. On an H200 the first ~20 s of sweeps in a process ran
    slower, whether the host ran ahead or synced after each prompt (64 prompts: 14.6 s on
    the first pass, then 11.0-11.6 s; cause not found), so GPU timings warm up 30 s."""
    start = time.perf_counter()
    for i in itertools.count():
        p = prompts[i % len(prompts)]
        engine.run(p.clean, p.corrupt, p.identity, patches, options)
        sync(device)
        if time.perf_counter() - start >= warmup:
            break
    t = time.perf_counter()
    runs = [engine.run(p.clean, p.corrupt, p.identity, patches, options) for p in prompts]
    out = [(r.patched.cpu(), r.clean.cpu(), r.corrupt.cpu()) for r in runs]
    return time.perf_counter() - t, out


def logit_tolerance(dtype: str, results) -> float:
    """Rounding allowance, in logits, between two exact computations of the same patches:
    1e-4 in fp32 (the direct agreement checks); in bf16/fp16 twice the format's epsilon times
    the largest patched logit of `results` (two to four units in its last place: a bf16 unit
    at 32-64 is 0.25), the slack of the verdict against the float32 reference (`verdict`)."""
    if dtype == "float32":
        return 1e-4
    largest = max(float(r[0].abs().max()) for r in results)
    return 2 * torch.finfo(getattr(torch, dtype)).eps * max(largest, 1.0)


def scores_of(results) -> np.ndarray:
    patched = np.stack([r[0].numpy() for r in results], axis=1)
    clean = np.stack([r[1].numpy() for r in results])
    corrupt = np.stack([r[2].numpy() for r in results])
    return restoration(patched, clean, corrupt, n_boot=0).score


@contextmanager
def cast(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`model` in `dtype` inside the block, then with every parameter and buffer as before, in
    its own dtype with its own values. Those `dtype` holds exactly (bfloat16 weights in
    float32) are cast back; the others are kept aside and put back, since `model.to` back
    would round them: a bfloat16 Llama keeps its rotary `inv_freq` in float32 (rounded, it
    shifts the rotary angles of every later run by up to a few hundredths of a radian at 160
    tokens), and float32 weights lose their low bits in a 16-bit format."""
    saved = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    exact = torch.promote_types(t.dtype, dtype) == dtype
                    saved.append((table, name, t.dtype, None if exact else t.detach()))
    model.to(dtype)
    try:
        yield
    finally:
        for table, name, original, kept in saved:
            t = table[name]
            value = t.detach().to(original) if kept is None else kept
            if isinstance(t, torch.nn.Parameter):
                t.data = value
            else:
                table[name] = value


def engine_in(dtype: str, engine, model, prompts, patches, options, device):
    """Seconds and (patched, clean, corrupt) per prompt of `engine` with `model` cast to
    `dtype`. No warm-up: the seconds include rebuilding the fused weights in `dtype` (the
    engine's next run rebuilds them in the model's own dtype)."""
    with cast(model, getattr(torch, dtype)):
        t = time.perf_counter()
        out = []
        for p in prompts:
            r = engine.run(p.clean, p.corrupt, p.identity, patches, options)
            out.append((r.patched.cpu(), r.clean.cpu(), r.corrupt.cpu()))
        sync(device)
        return time.perf_counter() - t, out


def with_error(results, error: float):
    """`results` with `error` added to the first option's patched logit of every row: the
    seam through which a test makes the engine wrong and checks that the benchmark fails."""
    if not error:
        return results
    out = []
    for patched, clean, corrupt in results:
        patched = patched.clone()
        patched[:, 0] += error
        out.append((patched, clean, corrupt))
    return out


def error_of(values: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
             ) -> tuple[float, float]:
    """Max and mean |values - reference| over every element of the paired tensors."""
    diff = torch.cat([(v.double() - r.double()).abs().flatten()
                      for v, r in zip(values, reference, strict=True)])
    return float(diff.max()), float(diff.mean())


def head_metric(results, groups: list[list[int]], rows, shape) -> list[torch.Tensor]:
    """TransformerLens's metric from the engine's option logits: the first two options' logit
    difference after each head patch (`rows` of each prompt's patched logits), averaged over
    each group's prompts; per group, of `shape` (layers, heads)."""
    return [torch.stack([results[i][0][rows, 0] - results[i][0][rows, 1] for i in members])
            .mean(0).view(shape) for members in groups]


def verdict(errors: dict[str, float], engines: Sequence[str], slack: float
            ) -> tuple[bool, dict[str, str]]:
    """Whether each engine computation is at least as close to the float32 reference as the
    other computations of the same quantity. `errors`: each computation's max |error| against
    the reference. An engine passes when its error is at most the largest of the others' plus
    `slack` (NaN fails); with no other computation to compare with, it passes. Returns that
    and each computation's verdict ("peer" for the others)."""
    peers = {name: e for name, e in errors.items() if name not in engines}
    if not peers:
        return True, dict.fromkeys(errors, "pass: no other computation to compare with")
    worst = max(peers, key=peers.__getitem__)
    bound = peers[worst] * 1.0 + slack
    marks = dict.fromkeys(peers, "peer")
    ok = True
    for name in engines:
        if name not in errors:
            continue
        good = bool(errors[name] <= bound)  # False for NaN
        ok = ok and good
        marks[name] = (f"{'pass' if good else 'FAIL'}: {errors[name]:.2e} "
                       f"{'<=' if good else '>'} {worst} {peers[worst]:.2e} + slack "
                       f"{slack:.2e}")
    return ok, marks


@dataclass
class Error:
    """One computation's error against the float32 reference on one quantity."""

    computation: str
    dtype: str
    quantity: str  # "patched logits" or "head metric"
    over: str  # what the error is taken over
    max: float
    mean: float


def report(errors: list[Error], engines: Sequence[str], slack: float, reference: str,
           slack_note: str) -> bool:
    """Print each computation's error against the float32 reference and its verdict, one
    table, and how the slack was set; a FAIL line (stderr) for each engine computation that
    fails. True if none does."""
    print(f"\nerror against the {REFERENCE_DTYPE} reference: {reference}")
    header = (f"  {'computation':<22} {'dtype':<9} {'quantity':<15} {'over':<24} "
              f"{'max |error|':>11} {'mean |error|':>12}  verdict")
    print(header)
    ok, fails = True, []
    for quantity in dict.fromkeys(e.quantity for e in errors):
        rows = [e for e in errors if e.quantity == quantity]
        good, marks = verdict({e.computation: e.max for e in rows}, engines, slack)
        ok = ok and good
        for e in rows:
            print(f"  {e.computation:<22} {e.dtype:<9} {e.quantity:<15} {e.over:<24} "
                  f"{e.max:11.2e} {e.mean:12.2e}  {marks[e.computation]}")
            if marks[e.computation].startswith("FAIL"):
                fails.append(f"FAIL: {e.computation} vs {REFERENCE_DTYPE} on the {quantity}: "
                             f"further from it than the others allow, max |error| "
                             f"{marks[e.computation][6:]}")
    print(f"  slack: {slack_note}")
    for line in fails:
        print(line, file=sys.stderr)
    return ok


def audit_time(args, prompts: list[Prompt]) -> tuple[float, bool, int] | None:
    """`run_audit`'s patching stage on the benchmark's own questions, pair and sweeps
    (screen, bootstrap and attention off), timed right after the engine so that both run in
    the same state of the process (warmed up, nothing else in between; a run after the AtP
    screen's backward passes came out about 10% slower on a CPU). Returns its seconds,
    whether its prompts are the benchmark's, and how many; None without --model."""
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec

    if getattr(args, "audit_inputs", None) is None:
        return None
    loaded, questions = args.audit_inputs
    spec = AuditSpec(n_questions=None, pairs=[("a Black person", "a White person")],
                     noise_floor=False, components=tuple(args.sweeps), bootstrap=0,
                     attention=False)
    result = run_audit(loaded, spec, questions=questions, chunk_rows=args.chunk_rows,
                       progress=False)
    same = sorted(tuple(p["corrupt_ids"]) for p in result.prompts) == sorted(
        tuple(p.corrupt) for p in prompts)
    return result.meta["timings_s"]["patching"], same, len(result.prompts)


def audit_line(timed: tuple[float, bool, int] | None, t_engine: float) -> None:
    if timed is None:
        print("--audit needs --model: a random-weight --shape has no questions or tokenizer")
        return
    t_audit, same, n = timed
    print(f"audit (run_audit) patching stage {t_audit:9.2f} s on "
          f"{'the same' if same else 'DIFFERENT'} {n} prompt pairs: "
          f"{t_audit / t_engine:.2f}x the engine's {t_engine:.2f} s")


def main(argv: list[str] | None = None, *, engine_error: float = 0.0) -> int:
    """Run the benchmark; 0 if its checks pass, 1 if not. `engine_error` is added to the
    first option's patched logit of the engine's results before they are checked (a seam for
    tests: the checks must catch it)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model source or pinned asset (ignored with --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of a shape")
    parser.add_argument("--pairs", type=int, default=4, help="prompt pairs")
    parser.add_argument("--tokens", type=int, default=160, help="tokens per prompt (--shape)")
    parser.add_argument("--sweeps", nargs="+", default=list(DEFAULT_SWEEPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        help=f"float32, or {' / '.join(LOW_PRECISION)}: then every computation "
                        f"is checked against the engine in {REFERENCE_DTYPE}")
    parser.add_argument("--chunk-rows", type=int,
                        help="rows per forward (default: the engine's: 32 on a CPU, sized to "
                        "free memory on a GPU)")
    parser.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                        help="the engine's fused layers: auto = on for Llama-family "
                        "models; when on, the hooked engine is timed too")
    parser.add_argument("--parity-dtype", help="also run the engine with the model cast to this "
                        "dtype (e.g. float32) and print the largest score difference (with "
                        f"--dtype {' / '.join(LOW_PRECISION)} and {REFERENCE_DTYPE}, the run "
                        "of the float32 reference)")
    parser.add_argument("--transformer-lens", choices=["auto", "off"], default="auto",
                        help="auto: also time TransformerLens's own per-head sweep where it "
                        "is installed (pip install transformer-lens)")
    parser.add_argument("--warmup", type=float,
                        help="seconds of untimed engine runs before each engine timing "
                        "(default: 30 on a GPU; on a CPU one prompt)")
    parser.add_argument("--skip-hooked", action="store_true",
                        help="do not time the engine on the model's own layers with hooks")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="time only the engine and the screen")
    parser.add_argument("--audit", action="store_true",
                        help="also time the audit's own path (run_audit) on the same questions, "
                        "pair and sweeps (with --model)")
    parser.add_argument("--baseline-prompts", type=int,
                        help="run the baseline on this many prompts and scale its time")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 30.0 if device.type == "cuda" else 0.0
    low = args.dtype in LOW_PRECISION
    model, anatomy, prompts, options = load(args)
    patches = sweep(anatomy, [tuple(s.split(":")) for s in args.sweeps])
    tokens = [len(p.clean) for p in prompts]
    print(f"model {args.shape or args.model}  {anatomy.n_layers} layers x {anatomy.n_heads} heads"
          f"  {args.dtype} on {device}  torch {torch.__version__}")
    print(f"{len(prompts)} prompt pairs, {min(tokens)}-{max(tokens)} tokens, {len(patches)} "
          f"patches each ({', '.join(args.sweeps)})")

    fused = {"auto": None, "on": True, "off": False}[args.fused]
    engine = PatchingEngine(model, anatomy, chunk_rows=args.chunk_rows, fused=fused)
    t_ours, ours = time_engine(engine, prompts, patches, options, device, args.warmup)
    ours = with_error(ours, engine_error)
    mem_ours = peak_memory_gb(device)
    audit_timed = audit_time(args, prompts) if args.audit else None
    s_ours = scores_of(ours)
    kind = "fused" if engine.fused is not None else "hooked"
    engines = [f"engine ({kind})"]
    hooked_line, by_hooks = "", None
    rows = engine.rows_per_forward(max(tokens))
    print(f"rows per forward: {rows}" + ("" if args.chunk_rows else " (sized by the engine)"))
    if engine.fused is not None and not args.skip_hooked:
        hooked = PatchingEngine(model, anatomy, chunk_rows=args.chunk_rows, fused=False)
        t_hooked, by_hooks = time_engine(hooked, prompts, patches, options, device,
                                         args.warmup)
        engines.append("engine (hooked)")
        gap = max(float((a[0] - b[0]).abs().max()) for a, b in zip(ours, by_hooks, strict=True))
        hooked_line = (f"engine on the model's own layers with hooks {t_hooked:9.2f} s: the "
                       f"fused layers are {t_hooked / t_ours:.2f}x faster; max |logit "
                       f"difference| {gap:.1e}")

    triples = [(p.clean, p.corrupt, p.identity) for p in prompts]
    atp_screen(model, anatomy, triples[:1], patches, options)  # warm-up
    t = time.perf_counter()
    nums, dens = atp_screen(model, anatomy, triples, patches, options)
    sync(device)
    t_atp = time.perf_counter() - t
    s_atp = screen_scores(nums, dens)

    flops = engine_flops(anatomy, model.config, prompts, patches, engine.fused is not None)
    burst = matmul_peak(device, getattr(torch, args.dtype), 0.2)
    peak = matmul_peak(device, getattr(torch, args.dtype), min(t_ours, 5.0))
    print(f"\nengine ({kind}) {t_ours:9.2f} s   {flops / 1e12:8.2f} TFLOP   "
          f"{flops / t_ours / 1e12:7.2f} TFLOP/s = {flops / t_ours / peak:5.1%} of the measured "
          f"{args.dtype} matmul peak sustained for {min(t_ours, 5.0):.1f} s "
          f"({peak / 1e12:.2f} TFLOP/s; {flops / t_ours / burst:5.1%} of a 0.2 s burst, "
          f"{burst / 1e12:.2f})   peak memory {mem_ours:.2f} GB")
    if hooked_line:
        print(hooked_line)
    heads = [i for i, p in enumerate(patches) if p.component == "head"]
    print(f"AtP screen  {t_atp:9.2f} s   {t_ours / t_atp:6.1f}x faster than the exact sweep")
    for label, idx in (("all patches", list(range(len(patches)))), ("heads", heads)):
        if idx:
            agree = agreement(s_atp[idx], s_ours[idx], k=20)
            print(f"  agreement on {label:<11}: spearman {agree['spearman']:.3f}, recall@20 of "
                  f"the exact top-20 {agree['recall_at_20']:.2f} (n={int(agree['n'])})")

    if args.audit:
        audit_line(audit_timed, t_ours)

    # The engine with the model cast to each other dtype asked for, once, on every patch that
    # is compared: the sweeps, and in low precision the head sweep TransformerLens runs.
    head_sweep = sweep(anatomy, [("head", "all")])
    with_tl = (args.transformer_lens == "auto"
               and importlib.util.find_spec("transformer_lens") is not None)
    if low and args.skip_baseline and not with_tl:  # the reference would serve no check
        print(f"no loop or TransformerLens ran: the {args.dtype} results are not checked "
              f"against a {REFERENCE_DTYPE} reference")
        low = False
    known = set(patches)
    cast_patches = patches + ([p for p in head_sweep if p not in known] if low and with_tl
                              else [])
    cast_dtypes = ([REFERENCE_DTYPE] if low else []) + ([args.parity_dtype]
                                                         if args.parity_dtype else [])
    cast_runs = {dtype: engine_in(dtype, engine, model, prompts,
                                  cast_patches if dtype == REFERENCE_DTYPE else patches,
                                  options, device)
                 for dtype in dict.fromkeys(cast_dtypes)}
    n = len(patches)
    if args.parity_dtype:
        s_ref32 = scores_of([(r[0][:n], r[1], r[2]) for r in cast_runs[args.parity_dtype][1]])
        gap = float(np.nanmax(np.abs(s_ours - s_ref32)))
        print(f"parity      {args.dtype} vs {args.parity_dtype}: max |S difference| {gap:.2e}, "
              f"mean {float(np.nanmean(np.abs(s_ours - s_ref32))):.2e}")
    errors: list[Error] = []
    reference, where, described = None, {}, ""
    if low:
        t_ref, reference = cast_runs[REFERENCE_DTYPE]
        where = {p: i for i, p in enumerate(cast_patches)}
        described = (f"the engine ({kind}) in {REFERENCE_DTYPE} on {device} ({t_ref:.2f} s), "
                     f"the model cast from {args.dtype} (the same weights), the same prompts "
                     f"and patches")
    if args.transformer_lens == "auto":
        tl = compare_transformer_lens(model, anatomy, engine, prompts, patches, options, device,
                                      args, t_ours, ours, engine_error)
        if tl is not None and low:
            print(f"  (both in {args.dtype}; each against {REFERENCE_DTYPE} below)")
            ref_metric = head_metric(reference, tl.groups, [where[p] for p in head_sweep],
                                     tl.ours[0].shape)
            over = f"{len(tl.groups)} group(s) x {len(head_sweep)} heads"
            errors += [Error(engines[0], args.dtype, "head metric", over,
                             *error_of(tl.ours, ref_metric)),
                       Error(tl.name, args.dtype, "head metric", over,
                             *error_of(tl.theirs, ref_metric))]
        elif tl is not None:
            tol = logit_tolerance(args.dtype, ours)
            if tl.gap > tol:
                print(f"FAIL: TransformerLens's metric differs from the engine's by more than "
                      f"{tol:.2g}", file=sys.stderr)
                return 1
    n_base, base = len(prompts), None
    if not args.skip_baseline:
        n_base = args.baseline_prompts or len(prompts)
        if device.type == "cuda":  # the loop's own peak, not the engines' or TransformerLens's
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        base = baseline(model, anatomy, prompts[:n_base], patches, options, device)
        sync(device)
        t_base = (time.perf_counter() - t) * len(prompts) / n_base
        s_base = scores_of(base)
        s_ref = scores_of(ours[:n_base])
        logit_gap = max(float((o[0] - b[0]).abs().max())
                        for o, b in zip(ours, base, strict=False))
        shift = min(float(np.linalg.norm(_centred(b[1]) - _centred(b[2]))) for b in base)
        diff = float(np.nanmax(np.abs(s_base - s_ref)))
        span = float(np.nanmax(s_ref) - np.nanmin(s_ref)) or 1.0
        scaled = "" if n_base == len(prompts) else f" (timed on {n_base} prompts, scaled)"
        print(f"TL-style    {t_base:9.2f} s{scaled}   peak memory {peak_memory_gb(device):.2f} GB")
        print(f"\nspeedup     {t_base / t_ours:6.2f}x")
        print(f"agreement   max |logit difference| {logit_gap:.1e}; max |S difference| {diff:.1e} "
              f"({diff / span:.1e} of the score range; S divides by persona shifts as small as "
              f"{shift:.3f})" + (f" (both in {args.dtype}; each against {REFERENCE_DTYPE} "
                                 "below)" if low else ""))
        if not low:
            tol = logit_tolerance(args.dtype, ours)
            if logit_gap > tol:
                print(f"FAIL: patched logits differ by more than {tol:.2g}", file=sys.stderr)
                return 1
    if not low:
        return 0
    # The engine and the loop on the prompts the loop ran.
    ref_logits = [r[0][:n] for r in reference[:n_base]]
    over = f"{n_base} prompt{'s' * (n_base != 1)} x {n} patches"
    logits = [(engines[0], ours)] + ([("engine (hooked)", by_hooks)] if by_hooks else [])
    logits += [("TL-style loop", base)] if base is not None else []
    errors = [Error(name, args.dtype, "patched logits", over,
                    *error_of([r[0] for r in results[:n_base]], ref_logits))
              for name, results in logits] + errors
    # Slack: an engine passes when it is no further from float32 than the loop and
    # TransformerLens plus twice the format's epsilon times the largest logit (two to four
    # units in its last place). Their max errors are extremes of the same accumulated
    # rounding, summed in another order (chunked rows, fused kernels, runs resumed at the
    # patched layer), and each output is rounded to the format once more at the end (half a
    # unit either way), so on one run the engine's may land a unit or two above theirs; an
    # engine that loses precision (a stale or lower-precision intermediate) is further off
    # than that.
    slack = logit_tolerance(args.dtype, reference)
    eps = torch.finfo(getattr(torch, args.dtype)).eps
    note = (f"2 x {args.dtype} epsilon {eps:.2e} x max(1, largest |{REFERENCE_DTYPE} patched "
            f"logit|) {slack / (2 * eps):.3g} = {slack:.2e}, on top of the others' max error")
    return 0 if report(errors, engines, slack, described, note) else 1


@dataclass
class HeadSweeps:
    """TransformerLens's head sweep and the engine's on the same prompts: the metric per
    prompt group, (layers, heads) each."""

    name: str  # TransformerLens and its version
    groups: list[list[int]]
    theirs: list[torch.Tensor]
    ours: list[torch.Tensor]
    gap: float  # max |theirs - ours|


def compare_transformer_lens(model, anatomy, engine, prompts, patches, options, device, args,
                             t_ours, ours, engine_error: float = 0.0) -> HeadSweeps | None:
    """Time TransformerLens's per-head sweep beside the engine's on the same head patches and
    print how far apart their metrics are; None where TransformerLens is missing (it says
    so)."""
    tl = transformer_lens_heads(model, prompts, options, device)
    if tl is None:
        print("TransformerLens is not installed: its own sweep was not timed "
              "(pip install transformer-lens)")
        return None
    from importlib.metadata import version

    t_tl, groups, metric = tl
    heads = sweep(anatomy, [("head", "all")])
    if patches != heads:  # time the engine on the head sweep alone
        t_ours, ours = time_engine(engine, prompts, heads, options, device, args.warmup)
        ours = with_error(ours, engine_error)
    ours_metric = head_metric(ours, groups, slice(None), (anatomy.n_layers, anatomy.n_heads))
    gap = max(float((m - o).abs().max()) for m, o in zip(metric, ours_metric, strict=True))
    span = max(float(o.max() - o.min()) for o in ours_metric) or 1.0
    name = f"TransformerLens {version('transformer-lens')}"
    print(f"\n{name} get_act_patch_attn_head_out_all_pos "
          f"{t_tl:9.2f} s ({len(groups)} batch(es) of one prompt length)   engine on the same "
          f"{len(heads)} head patches {t_ours:.2f} s   speedup {t_tl / t_ours:6.2f}x")
    print(f"  agreement: max |logit-difference metric difference| {gap:.1e} "
          f"({gap / span:.1e} of its range over heads)")
    return HeadSweeps(name, groups, metric, ours_metric, gap)


def _centred(x: torch.Tensor) -> np.ndarray:
    x = x.numpy().astype(np.float64)
    return x - x.mean()


if __name__ == "__main__":
    sys.exit(main())
