"""The audit plan within a budget: how many patches of each sweep to verify exactly.

With `budget_minutes` in a spec (and `screen: atp`), the audit screens every patch of every
pair first, then verifies only the top k of each (component, positions) sweep by exact
patching, with k chosen so that the patching stage fits what the budget leaves it:

    cost(k) = Σ_pairs Σ_questions [ overhead + seconds_per_flop · Σ_{patch in top k} flops ]

`flops` comes from the model's shape (`ModelShape`, `patch_flops`: a row resumed at its
patch's layer from the first position the patch can change, as the engine computes it);
`overhead` and `seconds_per_flop` from a short calibration on the device (`calibrate`: a
few real patches of one prompt pair, timed). The noise-floor pair is verified at every
component a persona pair chose as well, so persona effects and the floor are compared on
the same components.

Every sweep gets at least its top `MIN_K` (the report's top 10), whatever the budget. Once
the first exact pass has run, the screen's agreement with what was verified (Spearman and
recall of the exact top half, per sweep) is measured; a sweep whose agreement is low is
widened (k doubled, best first, pass after pass) while the measured rate says the budget
still allows it. The budget covers the whole audit: the persona pass after patching is
estimated first (`reserve_s`) and kept out of what patching may spend. Everything the plan
estimated, chose, skipped and measured goes into `audit.json`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from governance.audit.tables import PairScores
    from governance.inputs.personas import PersonaPair
    from governance.patching.engine import Patch

MIN_SPEARMAN = 0.6  # below either, a sweep's screen is not trusted and its k is widened
MIN_RECALL = 0.8
FIRST_PASS_SHARE = 0.8  # of the budget left after the screen; the rest is kept for widening
MIN_K = 10  # every sweep's top 10 (the report's) is verified, or the whole sweep if smaller
CALIBRATION_PATCHES = 64  # per prompt pair on the per-pair engine
CALIBRATION_PROMPTS = 8  # prompt pairs of a packed calibration (each with 64 / 8 patches)


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a patch depends on: the decoder's matmul sizes."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated_mlp: bool = True

    @classmethod
    def of(cls, model: Any, anatomy: Any) -> ModelShape:
        config = model.config
        ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return cls(anatomy.n_layers, anatomy.d_model, anatomy.n_heads, anatomy.n_kv_heads,
                   anatomy.head_dim, ff or 4 * anatomy.d_model,
                   hasattr(config, "intermediate_size"))

    def layer_flops(self, q_tokens: int, k_tokens: int, kv_tokens: int | None = None) -> float:
        """Matmul FLOPs of one decoder layer: queries, o_proj and MLP for `q_tokens`,
        attention over `k_tokens` keys, key/value projections for `kv_tokens`."""
        dq, dkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        mlp = 2 * (3 if self.gated_mlp else 2) * self.d_model * self.d_ff
        per_query = 2 * self.d_model * dq * 2 + mlp + 2 * 2 * k_tokens * dq
        kv = 2 * self.d_model * 2 * dkv
        return q_tokens * per_query + (q_tokens if kv_tokens is None else kv_tokens) * kv


def patch_flops(shape: ModelShape, patch: Patch, length: int, begin: int) -> float:
    """FLOPs of one exact patch on a prompt pair of `length` tokens whose row is recomputed
    from position `begin` on: the layers after the patch's on those positions, the last
    layer's queries, o_proj and MLP at the last position only."""
    q = length - begin
    return ((shape.n_layers - 1 - patch.layer) * shape.layer_flops(q, length, q)
            + shape.layer_flops(1, length, kv_tokens=q))


def record_flops(shape: ModelShape, length: int) -> float:
    """The clean and corrupted recording runs of one prompt pair."""
    return 2 * shape.n_layers * shape.layer_flops(length, length)


@dataclass(frozen=True)
class PromptShape:
    """A prompt pair as the cost model sees it: its length and where each kind of patch
    begins (`patch_begins`)."""

    length: int
    begins: dict[str, int]

    @classmethod
    def of(cls, clean_ids: Sequence[int], corrupt_ids: Sequence[int],
           identity: Sequence[int]) -> PromptShape:
        from governance.patching.engine import patch_begins, position_masks

        masks = position_masks(len(clean_ids), identity)
        return cls(len(clean_ids), patch_begins(masks, clean_ids, corrupt_ids))


def flops_table(shape: ModelShape, patches: Sequence[Patch],
                prompts: Sequence[PromptShape]) -> np.ndarray:
    """(patch,) FLOPs of `patch_flops` summed over `prompts`: one (kind, layer) table per
    prompt, read at each patch's positions and layer."""
    kinds = sorted({p.positions for p in patches})
    layer = np.array([p.layer for p in patches], dtype=int)
    kind = np.array([kinds.index(p.positions) for p in patches], dtype=int)
    after = shape.n_layers - 1 - np.arange(shape.n_layers)  # layers after each layer
    out = np.zeros(len(patches))
    for p in prompts:
        table = np.empty((len(kinds), shape.n_layers))  # (kind, layer)
        for k, name in enumerate(kinds):
            q = p.length - p.begins[name]
            table[k] = (after * shape.layer_flops(q, p.length, q)
                        + shape.layer_flops(1, p.length, kv_tokens=q))
        out += table[kind, layer]
    return out


@dataclass(frozen=True)
class Calibration:
    """Seconds per prompt pair not spent on rows (recording, transfers) and seconds per FLOP
    of rows, measured on this device with this model."""

    overhead_s: float
    seconds_per_flop: float
    seconds: float  # what the calibration itself took

    def seconds_for(self, n_prompt_pairs: int, flops: float) -> float:
        return n_prompt_pairs * self.overhead_s + flops * self.seconds_per_flop


def calibrate(run: Callable[[Sequence[Patch]], Any], patches: Sequence[Patch],
              shape: ModelShape, prompts: Sequence[PromptShape],
              n: int = CALIBRATION_PATCHES) -> Calibration:
    """Time `run` (the `prompts`' pairs through the engine, each with the same patches,
    results read back) on one patch and on `n` patches spread over every sweep, the faster of
    two runs each, after an untimed warm-up of both (on a GPU, the first run of each shape
    compiles kernels). The overhead is per prompt pair."""
    t0 = time.perf_counter()
    stride = max(1, len(patches) // n)
    sample = list(patches[::stride])[:n]
    one = sample[:1]
    run(one)  # warm-up
    run(sample)
    timed = []
    for chosen in (one, sample):
        best = math.inf
        for _ in range(2):
            t = time.perf_counter()
            run(chosen)
            best = min(best, time.perf_counter() - t)
        timed.append(best)
    f_one, f_sample = (float(flops_table(shape, c, prompts).sum()) for c in (one, sample))
    per_flop = max(timed[1] - timed[0], 1e-9) / max(f_sample - f_one, 1.0)
    overhead = max(timed[0] - per_flop * f_one, 0.0) / len(prompts)
    return Calibration(overhead, per_flop, time.perf_counter() - t0)


def calibration_run(engine: Any, aligned: dict[PersonaPair, list], option_ids: Sequence[int]
                    ) -> tuple[Callable[[Sequence[Patch]], Any], list[PromptShape]]:
    """What `calibrate` times, as the exact pass runs: one prompt pair through the per-pair
    engine; with packed batches, `CALIBRATION_PROMPTS` prompt pairs in one batch (the rate a
    lone pair gets there is not the rate of the audit's batches)."""
    from governance.patching.packed import Item

    n = CALIBRATION_PROMPTS if engine.packed is not None else 1
    every = [ap for aps in aligned.values() for ap in aps]
    sample = every[:: max(1, len(every) // n)][:n]

    def run(chosen: Sequence[Patch]) -> None:
        items = [Item(ap.clean_ids, ap.corrupt_ids, ap.identity, chosen) for ap in sample]
        for r in engine.run_many(items, option_ids):
            r.patched.cpu()

    return run, [PromptShape.of(ap.clean_ids, ap.corrupt_ids, ap.identity) for ap in sample]


# -- choosing k -----------------------------------------------------------------------------


def sweep_of(patch: Patch) -> str:
    return f"{patch.component}:{patch.positions}"


def ranked(patches: Sequence[Patch], estimate: np.ndarray) -> dict[str, list[int]]:
    """Per sweep, patch indices by decreasing |estimate| (the screen's order)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patches):
        groups.setdefault(sweep_of(p), []).append(i)
    score = np.abs(np.nan_to_num(np.asarray(estimate, dtype=float)))
    return {s: sorted(m, key=lambda i: -score[i]) for s, m in groups.items()}


def choose(order: dict[str, dict[str, list[int]]], k: dict[str, int],
           floor: str | None) -> dict[str, list[int]]:
    """Patch indices each pair verifies: its own top k of every sweep; the noise-floor pair
    (`floor`) also every index a persona pair chose."""
    chosen = {pair: sorted(i for s, idx in by_sweep.items() for i in idx[:k[s]])
              for pair, by_sweep in order.items()}
    if floor in chosen:
        shared = set().union(*(set(c) for p, c in chosen.items() if p != floor))
        chosen[floor] = sorted(set(chosen[floor]) | shared)
    return chosen


def cost_of(chosen: dict[str, list[int]], flops: dict[str, np.ndarray], n_questions: int,
            cal: Calibration) -> float:
    """Estimated seconds of exact patching of `chosen` (pair -> indices)."""
    total = sum(float(flops[pair][idx].sum()) for pair, idx in chosen.items() if idx)
    return cal.seconds_for(n_questions * len(chosen), total)


def fit_k(order: dict[str, dict[str, list[int]]], flops: dict[str, np.ndarray],
          n_questions: int, cal: Calibration, seconds: float, floor: str | None,
          start: dict[str, int] | None = None) -> dict[str, int]:
    """The largest k per sweep, raised one step at a time round-robin over the sweeps (every
    sweep gets at least `MIN_K`, or all of it if smaller, whatever the budget), whose
    estimated exact cost fits `seconds`."""
    sizes = {s: len(idx) for by_sweep in order.values() for s, idx in by_sweep.items()}
    k = dict(start) if start else {s: min(MIN_K, n) for s, n in sizes.items()}
    grown = True
    while grown:
        grown = False
        for s in sizes:
            if k[s] >= sizes[s]:
                continue
            trial = {**k, s: k[s] + 1}
            if cost_of(choose(order, trial, floor), flops, n_questions, cal) <= seconds:
                k, grown = trial, True
    return k


# -- agreement and widening -----------------------------------------------------------------


def verified_agreement(estimate: dict[str, np.ndarray], exact: dict[str, dict[int, float]],
                       patches: Sequence[Patch]) -> dict[str, dict[str, float]]:
    """Per sweep, how well the screen ranked what was verified, averaged over pairs: Spearman
    between estimate and exact score, and recall of the exact top half among the screen's
    top half."""
    from governance.patching.attribution import agreement

    per_sweep: dict[str, list[dict[str, float]]] = {}
    for pair, scores in exact.items():
        groups: dict[str, list[int]] = {}
        for i in scores:
            groups.setdefault(sweep_of(patches[i]), []).append(i)
        for s, idx in groups.items():
            est = np.array([estimate[pair][i] for i in idx])
            ex = np.array([scores[i] for i in idx])
            if len(idx) < 2 or not (np.isfinite(est).all() and np.isfinite(ex).all()):
                per_sweep.setdefault(s, []).append((math.nan, math.nan))  # unknown
                continue
            half = max(1, len(idx) // 2)
            a = agreement(est, ex, half)
            per_sweep.setdefault(s, []).append((a["spearman"], a[f"recall_at_{half}"]))
    return {s: {"spearman": _mean([a for a, _ in rows]), "recall": _mean([r for _, r in rows]),
                "pairs": sum(not math.isnan(a) for a, _ in rows)}
            for s, rows in per_sweep.items()}


def _mean(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def low_agreement(agree: dict[str, dict[str, float]]) -> list[str]:
    """Sweeps whose screen is not trusted, worst first: agreement below `MIN_SPEARMAN` or
    `MIN_RECALL`, or unknown (fewer than two patches verified)."""
    low = [s for s, a in agree.items()
           if not (a["spearman"] >= MIN_SPEARMAN and a["recall"] >= MIN_RECALL)]
    return sorted(low, key=lambda s: np.nan_to_num(agree[s]["spearman"] + agree[s]["recall"],
                                                   nan=-np.inf))


def widen(order: dict[str, dict[str, list[int]]], flops: dict[str, np.ndarray],
          n_questions: int, cal: Calibration, seconds: float, floor: str | None,
          k: dict[str, int], sweeps: Sequence[str]) -> dict[str, int]:
    """`k` with each of `sweeps` (worst first) doubled where the extra exact patches fit
    `seconds`; unchanged where they do not."""
    sizes = {s: len(idx) for by_sweep in order.values() for s, idx in by_sweep.items()}
    before = choose(order, k, floor)
    out = dict(k)
    for s in sweeps:
        trial = {**out, s: min(sizes[s], 2 * out[s])}
        if trial[s] == out[s]:
            continue
        extra = _added(before, choose(order, trial, floor))
        if cost_of(extra, flops, n_questions, cal) <= seconds:
            out = trial
    return out


def _added(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    return {p: sorted(set(after[p]) - set(before.get(p, []))) for p in after}


# -- the record -----------------------------------------------------------------------------


@dataclass
class AuditPlan:
    """What the plan estimated, chose and measured: `audit.json`'s `plan`."""

    budget_s: float
    shape: dict[str, Any]
    calibration: dict[str, float]
    screen_s: float
    k: dict[str, int]
    k_first_pass: dict[str, int]
    sweep_sizes: dict[str, int]
    exact_patches: int  # summed over pairs, per question
    skipped_patches: int
    estimated_exact_s: float
    actual_exact_s: float = math.nan
    widened: list[str] = field(default_factory=list)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    exact_flops: float = 0.0
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "min_spearman": MIN_SPEARMAN, "min_recall": MIN_RECALL,
        "first_pass_share": FIRST_PASS_SHARE, "min_k": MIN_K})
    over_budget: bool = False
    elapsed_s: float = math.nan
    reserved_s: float = 0.0  # kept for the persona pass after patching (its estimate)
    chosen: dict[str, list[Patch]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record for `audit.json` (`chosen` stays out: the scores table lists it)."""
        out = asdict(self)
        out.pop("chosen")
        out["elapsed_s"] = round(float(out["elapsed_s"]), 3)
        for key in ("estimated_exact_s", "actual_exact_s", "screen_s", "budget_s", "reserved_s"):
            out[key] = round(float(out[key]), 3)
        return out

    def summary(self) -> str:
        ks = ", ".join(f"{s} {self.k[s]}/{self.sweep_sizes[s]}" for s in self.k)
        return (f"budget {self.budget_s / 60:.1f} min: screen {self.screen_s:.1f} s, exact "
                f"estimated {self.estimated_exact_s:.1f} s, took {self.actual_exact_s:.1f} s; "
                f"k per sweep {ks}; {self.skipped_patches} patch-pairs estimated only")


# -- the patching stage under a budget ------------------------------------------------------


@dataclass
class FirstPass:
    """The plan before any exact patching: the screen's estimates, each pair's ranking and
    FLOPs, the calibration and the k per sweep of the first exact pass."""

    estimates: dict[PersonaPair, np.ndarray]
    order: dict[str, dict[str, list[int]]]  # pair label -> sweep -> patch indices, best first
    flops: dict[str, np.ndarray]  # pair label -> (patch,) FLOPs over its questions
    calibration: Calibration
    shape: ModelShape
    k: dict[str, int]
    floor: str | None
    n_questions: int
    screen_s: float
    started: float  # time.perf_counter() when planning began

    @property
    def chosen(self) -> dict[str, list[int]]:
        """Patch indices each pair verifies, by pair label."""
        return choose(self.order, self.k, self.floor)

    def chosen_patches(self, patches: Sequence[Patch]) -> dict[str, list[Patch]]:
        """Each pair's patches to verify exactly, by pair label: what every question shard
        of the audit patches."""
        return {label: [patches[i] for i in idx] for label, idx in self.chosen.items()}


def plan_first_pass(
    loaded: Any,
    engine: Any,
    aligned: dict[PersonaPair, list],
    patches: Sequence[Patch],
    option_ids: Sequence[int],
    budget_s: float,
    workers: int = 1,
    reserve_s: float = 0.0,
) -> FirstPass:
    """Calibrate, screen every pair, and pick the largest k per sweep whose exact patching
    fits `FIRST_PASS_SHARE` of the budget left (less `reserve_s`, kept for the audit's
    persona pass), with the questions split evenly over `workers` devices of this one's
    speed."""
    from governance.audit.screen import screen_pairs

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    pairs = list(aligned)
    n_q = len(aligned[pairs[0]])
    shape = ModelShape.of(loaded.model, loaded.anatomy)
    floor = next((p.label for p in pairs if p.kind == "noise_floor"), None)
    run, prompts = calibration_run(engine, aligned, option_ids)
    cal = calibrate(run, patches, shape, prompts, n=CALIBRATION_PATCHES // len(prompts))
    t = time.perf_counter()
    estimates = screen_pairs(loaded, aligned, patches, option_ids)
    screen_s = time.perf_counter() - t
    flops = {pair.label: flops_table(shape, patches, [
        PromptShape.of(ap.clean_ids, ap.corrupt_ids, ap.identity) for ap in aligned[pair]])
        for pair in pairs}
    order = {pair.label: ranked(patches, estimates[pair]) for pair in pairs}
    left = budget_s - reserve_s - (time.perf_counter() - t0)
    k = fit_k(order, flops, n_q, cal, FIRST_PASS_SHARE * left * workers, floor)
    return FirstPass(estimates, order, flops, cal, shape, k, floor, n_q, screen_s, t0)


def patch_within_budget(
    loaded: Any,
    engine: Any,
    aligned: dict[PersonaPair, list],
    patches: Sequence[Patch],
    option_ids: Sequence[int],
    budget_s: float,
    verify: Callable[[dict[PersonaPair, list[Patch]]], dict[PersonaPair, PairScores]],
    reserve_s: float = 0.0,
) -> tuple[dict[PersonaPair, PairScores], dict[PersonaPair, np.ndarray], AuditPlan]:
    """`plan_first_pass`, the exact pass, then widening (k doubled, pass after pass) of the
    sweeps where the screen disagreed with what was verified, while the budget less
    `reserve_s` allows. `verify` runs exact patching of pair -> patches on every question of each
    pair. Returns the exact runs, the screen's estimates and the plan (whose `chosen` is
    each pair's verified patches, by pair label)."""
    fp = plan_first_pass(loaded, engine, aligned, patches, option_ids, budget_s,
                         reserve_s=reserve_s)
    pairs = list(aligned)
    estimates, order, flops, cal, floor, n_q = (fp.estimates, fp.order, fp.flops,
                                                fp.calibration, fp.floor, fp.n_questions)
    t0, k_first, chosen, screen_s, shape = fp.started, fp.k, fp.chosen, fp.screen_s, fp.shape
    sizes = {s: len(idx) for s, idx in order[pairs[0].label].items()}
    estimated = cost_of(chosen, flops, n_q, cal)
    t = time.perf_counter()
    runs = verify({pair: [patches[i] for i in chosen[pair.label]] for pair in pairs})
    actual = time.perf_counter() - t
    agree = verified_agreement(*_exact_scores(runs, estimates, patches), patches)

    k = dict(k_first)
    while low := [s for s in low_agreement(agree) if k[s] < sizes[s]]:
        scale = actual / estimated if estimated > 0 else 1.0  # what the passes measured
        measured = Calibration(cal.overhead_s * scale, cal.seconds_per_flop * scale,
                               cal.seconds)
        left = budget_s - reserve_s - (time.perf_counter() - t0)
        wider = widen(order, flops, n_q, measured, left, floor, k, low)
        extra = _added(chosen, choose(order, wider, floor))
        if not any(extra.values()):
            break
        estimated += cost_of(extra, flops, n_q, cal)
        t = time.perf_counter()
        more = verify({pair: [patches[i] for i in extra[pair.label]] for pair in pairs})
        actual += time.perf_counter() - t
        runs = {pair: _merge(runs[pair], more.get(pair)) for pair in pairs}
        k, chosen = wider, choose(order, wider, floor)
        agree = verified_agreement(*_exact_scores(runs, estimates, patches), patches)
    widened = [s for s in k if k[s] > k_first[s]]

    elapsed = time.perf_counter() - t0
    n_exact = sum(len(c) for c in chosen.values())
    plan = AuditPlan(
        budget_s=budget_s, shape=asdict(shape),
        calibration={"overhead_s": cal.overhead_s, "seconds_per_tflop":
                     cal.seconds_per_flop * 1e12, "seconds": round(cal.seconds, 3)},
        screen_s=screen_s, k=k, k_first_pass=k_first, sweep_sizes=sizes,
        exact_patches=n_exact, skipped_patches=len(pairs) * len(patches) - n_exact,
        estimated_exact_s=estimated, actual_exact_s=actual, widened=widened, agreement=agree,
        exact_flops=float(sum(flops[p][idx].sum() for p, idx in chosen.items())),
        over_budget=elapsed > budget_s - reserve_s, elapsed_s=elapsed, reserved_s=reserve_s,
        chosen={label: [patches[i] for i in idx] for label, idx in chosen.items()},
    )
    return runs, estimates, plan


def _exact_scores(runs, estimates, patches):
    """(pair label -> estimate) and (pair label -> {patch index: exact S}) of what ran."""
    from governance.patching.scores import restoration

    index = {p: i for i, p in enumerate(patches)}
    exact = {}
    for pair, run in runs.items():
        score = restoration(run.patched, run.clean, run.corrupt, n_boot=0).score
        exact[pair.label] = {index[p]: float(s) for p, s in zip(run.patches, score, strict=True)}
    return {pair.label: est for pair, est in estimates.items()}, exact


def _merge(a: PairScores, b: PairScores | None) -> PairScores:
    """One pair's exact runs of two passes (same questions, disjoint patches)."""
    if b is None:
        return a
    from governance.audit.tables import PairScores

    return PairScores(a.patches + b.patches, np.concatenate([a.patched, b.patched]),
                      a.clean, a.corrupt)
