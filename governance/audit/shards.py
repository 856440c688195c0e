"""Question shards: one audit split by question across workers or devices, merged exactly.

    parts = [run_shard(model, spec, Shard(i, 2)) for i in range(2)]   # anywhere, in any order
    result = merge(parts)                                              # == run_audit(model, spec)

Every score of an audit is a ratio of sums over questions, and every interval resamples
questions with a fixed seed. So a shard keeps the raw numbers of its questions (option
logits of the clean, corrupted and patched runs per pair, each persona's option logits, each
persona's identity mass per question), and `merge` puts them back in the order of the
sampled question list and builds the tables with the same functions `run_audit` uses: the
merged tables equal one run's: bit for bit in fp32 on a CPU (tests/test_shards.py); on a GPU,
as far as its kernels give the same numbers for the same question run twice.

A shard holds the questions at positions `index, index + count, ...` of the sampled list:
stable night to night, and each shard gets a share of every subject. With `screen: atp` the
screen ranks patches over all questions, so it runs once (`choose_patches`) and every shard
patches the same `chosen` patches; a shard never screens on its own questions.

`AuditPartial.to_bytes()` / `from_bytes()` carry a shard between processes as JSON and a
numpy archive (read with `allow_pickle=False`): nothing a worker returns can run code.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from governance.audit.result import AuditResult
from governance.audit.run import (
    align_pairs,
    audit_meta,
    exact_runs,
    load_setup,
    mean_mass,
    persona_pass_seconds,
    persona_rows,
    progress_bar,
    prompt_record,
)
from governance.audit.spec import AuditSpec, Inputs, prepare
from governance.errors import ConfigError, GovernanceError
from governance.inputs.personas import Persona, PersonaCatalogue, PersonaPair


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the questions at positions index, index + count, ..."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"shard count must be a positive integer, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ConfigError(f"shard index must be in 0..{self.count - 1}, got {self.index!r}")

    def positions(self, n_questions: int) -> list[int]:
        """Positions in the sampled question list that this shard audits."""
        if self.count > n_questions:
            raise ConfigError(f"{self.count} shards for {n_questions} questions: every shard "
                              f"needs at least one question; use at most {n_questions} shards")
        return list(range(self.index, n_questions, self.count))

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"


@dataclass
class PairRaw:
    """One pair's option logits on a shard's questions: clean and corrupt (q, option),
    patched (patch, q, option), and the aligned prompts' records in question order."""

    patches: list[Any]  # Patch
    clean: np.ndarray
    corrupt: np.ndarray
    patched: np.ndarray
    prompts: list[dict[str, Any]]


@dataclass
class AuditPartial:
    """The raw numbers of one shard: what `merge` needs to rebuild an audit's tables."""

    shard: Shard
    positions: list[int]  # in the full sampled question list
    pairs: list[PersonaPair]  # audited, in spec order (skipped pairs left out)
    raw: dict[str, PairRaw]  # per pair label
    persona_logits: dict[str, np.ndarray]  # per persona (q, option); NO_PERSONA included
    masses: dict[str, np.ndarray]  # per persona (q, layer, head) identity mass
    answers: np.ndarray  # (q,) correct option index
    meta: dict[str, Any] = field(default_factory=dict)
    # the screen, when this shard (the only one) ran it itself; else merge is given it
    screen: dict[str, ScreenChoice] = field(default_factory=dict)

    # -- transport ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A zip of `partial.json` (structure, metadata, prompts) and `arrays.npz`."""
        arrays: dict[str, np.ndarray] = {"answers": self.answers}
        head: dict[str, Any] = {
            "shard": [self.shard.index, self.shard.count], "positions": self.positions,
            "pairs": [_pair_json(p) for p in self.pairs], "meta": self.meta, "raw": {},
            "personas": list(self.persona_logits), "masses": list(self.masses),
            "screen": {k: c.to_json() for k, c in self.screen.items()},
        }
        for i, (label, r) in enumerate(self.raw.items()):
            head["raw"][label] = {"key": i, "prompts": r.prompts,
                                  "patches": [patch_json(p) for p in r.patches]}
            arrays |= {f"clean{i}": r.clean, f"corrupt{i}": r.corrupt, f"patched{i}": r.patched}
        for i, persona in enumerate(self.persona_logits):
            arrays[f"logits{i}"] = self.persona_logits[persona]
        for i, persona in enumerate(self.masses):
            arrays[f"mass{i}"] = self.masses[persona]
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("partial.json", json.dumps(head, default=str))
            zf.writestr("arrays.npz", npz.getvalue())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditPartial:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                head = json.loads(zf.read("partial.json"))
                npz = np.load(io.BytesIO(zf.read("arrays.npz")), allow_pickle=False)
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise GovernanceError(f"not an audit shard's result: {exc}") from exc
        raw = {
            label: PairRaw([patch_from(p) for p in r["patches"]],
                           arrays[f"clean{r['key']}"], arrays[f"corrupt{r['key']}"],
                           arrays[f"patched{r['key']}"], r["prompts"])
            for label, r in head["raw"].items()
        }
        return cls(
            Shard(*head["shard"]), head["positions"], [_pair_from(p) for p in head["pairs"]],
            raw, {p: arrays[f"logits{i}"] for i, p in enumerate(head["personas"])},
            {p: arrays[f"mass{i}"] for i, p in enumerate(head["masses"])},
            arrays["answers"], head["meta"],
            {k: ScreenChoice.from_json(c) for k, c in head.get("screen", {}).items()},
        )


def _pair_json(pair: PersonaPair) -> list[str]:
    return [pair.clean.phrase, pair.clean.category, pair.corrupt.phrase, pair.corrupt.category,
            pair.category, pair.kind]


def _pair_from(row: Sequence[str]) -> PersonaPair:
    return PersonaPair(Persona(row[0], row[1]), Persona(row[2], row[3]), row[4], row[5])


# -- the shard's model runs ---------------------------------------------------------------


@dataclass(frozen=True)
class ScreenChoice:
    """The AtP screen of one pair over all questions: its estimate of every patch of the
    sweep and the patches it keeps for exact patching."""

    patches: list[Any]  # Patch: the spec's whole sweep
    estimate: np.ndarray  # (len(patches),)
    chosen: list[Any]  # Patch: the top k of each sweep

    def to_json(self) -> dict[str, Any]:
        return {"patches": [patch_json(p) for p in self.patches],
                "estimate": [float(x) for x in self.estimate],
                "chosen": [patch_json(p) for p in self.chosen]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScreenChoice:
        return cls([patch_from(p) for p in data["patches"]],
                   np.asarray(data["estimate"], dtype=np.float64),
                   [patch_from(p) for p in data["chosen"]])


def patch_json(p: Any) -> list[Any]:
    """A patch as plain data: [component, layer, positions, head]."""
    return [p.component, p.layer, p.positions, p.head]


def patch_from(row: Sequence[Any]) -> Any:
    """The patch `patch_json` wrote."""
    from governance.patching.engine import Patch

    return Patch(row[0], int(row[1]), row[2], None if row[3] is None else int(row[3]))


def choose_patches(model: Any, spec: AuditSpec, *, inputs: Inputs | None = None,
                   device: str | None = None, dtype: str | None = None, workers: int = 1
                   ) -> dict[str, ScreenChoice]:
    """The AtP screen of every aligned pair over all of `spec`'s questions, run once; every
    shard then patches `{label: choice.chosen}` exactly. The top `exact_top_k` of each sweep,
    or with `budget_minutes` the plan's first pass for `workers` devices like this one
    (widening after the exact pass needs all questions in one process, so it is skipped)."""
    from governance.audit.screen import screen_pairs, top_k

    inputs = inputs or prepare(spec)
    loaded, builder, patches = load_setup(model, spec, inputs, device, dtype)
    aligned, _ = align_pairs(builder, inputs.pairs, inputs.questions, spec)
    option_ids = builder.option_ids()
    if spec.budget_minutes is not None:
        from governance.audit.plan import plan_first_pass
        from governance.patching.engine import PatchingEngine

        engine = PatchingEngine(loaded.model, loaded.anatomy)
        # each shard runs the persona pass on its share of the questions
        reserve = persona_pass_seconds(loaded, builder, inputs, inputs.questions, spec) / workers
        first = plan_first_pass(loaded, engine, aligned, patches, option_ids,
                                spec.budget_minutes * 60, workers=workers, reserve_s=reserve)
        picked = first.chosen_patches(patches)
        return {pair.label: ScreenChoice(patches, first.estimates[pair], picked[pair.label])
                for pair in aligned}
    estimates = screen_pairs(loaded, aligned, patches, option_ids)
    return {pair.label: ScreenChoice(patches, estimates[pair],
                                     top_k(patches, estimates[pair], spec.exact_top_k))
            for pair in aligned}


def run_shard(
    model: Any,
    spec: AuditSpec,
    shard: Shard = Shard(),
    *,
    chosen: Mapping[str, list[Any]] | None = None,
    inputs: Inputs | None = None,
    questions: list | None = None,
    device: str | None = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
) -> AuditPartial:
    """Audit the questions of `shard` and return their raw numbers (`merge` builds the
    tables). `chosen[pair label]` lists the patches to run exactly for that pair (from
    `choose_patches`); without it every patch of the spec's sweeps runs. With
    `screen: atp` and more than one shard, `chosen` is required: a screen on part of the
    questions would pick different patches in every shard."""
    from governance.patching.engine import PatchingEngine

    t0 = time.perf_counter()
    inputs = inputs or prepare(spec, questions)
    positions = shard.positions(len(inputs.questions))
    if spec.screen == "atp" and chosen is None:
        if shard.count > 1:
            raise ConfigError("with screen: atp the screen runs once over all questions: pass "
                              "`chosen` from choose_patches(model, spec) to every shard")
    loaded, builder, patches = load_setup(model, spec, inputs, device, dtype)
    own_screen: dict[str, ScreenChoice] = {}
    if spec.screen == "atp" and chosen is None:
        own_screen = choose_patches(loaded, spec, inputs=inputs)
        chosen = {k: c.chosen for k, c in own_screen.items()}
    qs = [inputs.questions[i] for i in positions]
    option_ids = builder.option_ids()
    aligned, skipped = align_pairs(builder, inputs.pairs, qs, spec)
    missing = [p.label for p in aligned if chosen is not None and p.label not in chosen]
    if missing:
        raise ConfigError(f"`chosen` names no patches for the pairs {missing}; it has "
                          f"{sorted(chosen or {})}")
    answers = np.array([q.answer_index for q in qs])

    engine = PatchingEngine(loaded.model, loaded.anatomy, chunk_rows=chunk_rows)
    bar = progress_bar(len(aligned) * len(qs), f"patching shard {shard.label}", progress)
    mine = {pair: list(patches if chosen is None else chosen[pair.label]) for pair in aligned}
    runs = exact_runs(engine, aligned, mine, option_ids, bar)
    bar.close()
    raw = {pair.label: PairRaw(run.patches, run.clean, run.corrupt, run.patched,
                               [prompt_record(pair, ap, option_ids, int(answers[j]))
                                for j, ap in enumerate(aligned[pair])])
           for pair, run in runs.items()}
    t1 = time.perf_counter()
    logits, masses = persona_rows(loaded, builder, inputs, qs, spec, progress)
    meta = audit_meta(spec, inputs, loaded, builder, patches, skipped, engine, chunk_rows)
    meta["timings_s"] = {"patching": t1 - t0, "behaviour_attention": time.perf_counter() - t1}
    return AuditPartial(shard, positions, [p for p in inputs.pairs if p in aligned], raw,
                        logits, masses, answers, meta, own_screen)


# -- the merge ------------------------------------------------------------------------------


def merge(partials: Sequence[AuditPartial],
          screen: Mapping[str, ScreenChoice] | None = None) -> AuditResult:
    """The audit of all shards' questions, as one `run_audit` would have produced it.
    `screen` (from `choose_patches`) adds the screen table and its agreement. Refuses shards
    that do not belong together (another spec, model or patch set, a missing or repeated
    shard)."""
    from governance.audit.screen import screen_agreement, screen_rows, screen_table
    from governance.audit.tables import (
        PairScores,
        attention_frame,
        behaviour_table,
        empty_attention,
        floor_statement,
        pair_table,
        score_table,
    )

    parts = _check(partials)
    first = parts[0]
    meta0 = first.meta
    order = np.argsort(np.concatenate([p.positions for p in parts]), kind="stable")
    spec = AuditSpec.model_validate(meta0["spec"])
    catalogue = PersonaCatalogue.model_validate(meta0["catalogue"])
    pairs = first.pairs

    def joined(arrays: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.take(np.concatenate(arrays, axis=axis), order, axis=axis)

    runs: dict[PersonaPair, PairScores] = {}
    aligned: dict[PersonaPair, list] = {}
    prompts: list[dict[str, Any]] = []
    for pair in pairs:
        raws = [p.raw[pair.label] for p in parts]
        runs[pair] = PairScores(raws[0].patches, joined([r.patched for r in raws], axis=1),
                                joined([r.clean for r in raws]), joined([r.corrupt for r in raws]))
        records = [rec for r in raws for rec in r.prompts]
        records = [records[i] for i in order]
        prompts += records
        aligned[pair] = [_Aligned(records[0]["padded"], records[0]["n_filler"])]
    answers = joined([p.answers for p in parts])
    logits = {k: joined([p.persona_logits[k] for p in parts]) for k in first.persona_logits}
    masses = {persona: mean_mass(joined([p.masses[persona] for p in parts]))
              for persona in first.masses}

    scores = score_table(runs, spec)
    screens = []
    screen = screen or first.screen
    if screen:
        screens = [screen_rows(pair, screen[pair.label].patches, screen[pair.label].estimate)
                   for pair in pairs]
    screen_frame = screen_table(screens, scores)
    behaviour = behaviour_table(logits, answers, catalogue, pairs)
    pairs_frame = pair_table(aligned, runs, logits, answers)
    attention = attention_frame(masses, catalogue, pairs) if masses else empty_attention()

    timings = {k: sum(p.meta["timings_s"].get(k, 0.0) for p in parts)
               for k in ("patching", "behaviour_attention")}
    meta = {k: meta0[k] for k in ("spec", "spec_sha256", "catalogue", "questions_sha256",
                                  "question_ids", "model", "option_token_ids", "option_tokens",
                                  "uses_chat_template", "n_patches_per_prompt",
                                  "skipped_pairs", "versions")}
    meta["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    meta["completed_at"] = pd.Timestamp.now(tz="UTC").isoformat()
    meta["run"] = {**meta0["run"], "shards": first.shard.count}
    meta["noise_floor"] = floor_statement(pairs_frame)
    if not screen_frame.empty:
        meta["screen_agreement"] = screen_agreement(screen_frame)
    return AuditResult(scores, attention, behaviour, pairs_frame, meta, prompts, screen_frame)


@dataclass(frozen=True)
class _Aligned:
    """What `pair_table` reads of a pair's first aligned prompt."""

    padded: str | None
    n_filler: int


def _check(partials: Sequence[AuditPartial]) -> list[AuditPartial]:
    """The shards sorted by index, after checking they are the parts of one audit."""
    if not partials:
        raise GovernanceError("merge needs at least one shard's result")
    parts = sorted(partials, key=lambda p: p.shard.index)
    first = parts[0]
    count = first.shard.count
    indices = [p.shard.index for p in parts]
    if any(p.shard.count != count for p in parts) or indices != list(range(count)):
        raise GovernanceError(f"shards {[p.shard.label for p in parts]} are not each of "
                              f"{count} shards exactly once")
    for p in parts[1:]:
        for key in ("spec_sha256", "question_ids", "option_token_ids"):
            if p.meta[key] != first.meta[key]:
                raise GovernanceError(f"shard {p.shard.label} differs from shard "
                                      f"{first.shard.label} in {key}: not parts of one audit")
        if (p.meta["model"].get("weights_fingerprint")
                != first.meta["model"].get("weights_fingerprint")):
            raise GovernanceError(f"shard {p.shard.label} audited other weights than shard "
                                  f"{first.shard.label}")
        if [q.label for q in p.pairs] != [q.label for q in first.pairs]:
            raise GovernanceError(f"shard {p.shard.label} audited other pairs")
        for label, r in p.raw.items():
            if r.patches != first.raw[label].patches:
                raise GovernanceError(f"shard {p.shard.label} patched other components for "
                                      f"{label}: every shard needs the same `chosen` patches")
    covered = sorted(i for p in parts for i in p.positions)
    if covered != list(range(len(first.meta["question_ids"]))):
        raise GovernanceError("the shards do not cover every question exactly once")
    return parts
