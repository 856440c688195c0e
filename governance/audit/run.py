"""The audit: question set and personas -> prompts -> model runs -> tidy score tables.

    spec = AuditSpec(questions="mmlu.jsonl", n_questions=100, categories=["race"])
    result = run_audit("path/to/model", spec)
    result.save("out/")

`AuditSpec` is frozen and serialisable: it is what MLflow records and what the spec hash
covers (together with the persona catalogue and the question file's content). How the audit
runs (device, dtype, batch rows) is not part of the spec.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd

from governance import __version__
from governance.audit.plan import patch_within_budget
from governance.audit.result import AuditResult
from governance.audit.screen import (
    screen_agreement,
    screen_pairs,
    screen_rows,
    screen_table,
    top_k,
)
from governance.audit.spec import (
    AuditSpec,
    Inputs,
    involved_personas,
    prepare,
    spec_hash,
)
from governance.audit.tables import (
    PairScores,
    attention_frame,
    behaviour_table,
    empty_attention,
    floor_statement,
    pair_table,
    score_table,
)
from governance.errors import ConfigError, PromptError
from governance.inputs.personas import NO_PERSONA, PersonaPair
from governance.inputs.questions import (
    Question,
)

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "persona_governance": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def run_audit(
    model: Any,
    spec: AuditSpec,
    *,
    questions: list[Question] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    inputs: Inputs | None = None,
    packed: bool | None = None,
) -> AuditResult:
    """Run the persona-patching audit of `spec` on `model` (a LoadedModel or a source that
    `governance.models.loading.load_model` accepts) and return its tables. `inputs` (from
    `prepare(spec)`) skips reading the spec's files again; they are checked before the model
    is loaded either way. `packed` chooses the engine's packed path (`PatchingEngine`; by
    default on where it runs: a GPU in half precision)."""
    from governance.patching.engine import PatchingEngine

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = inputs or prepare(spec, questions)
    catalogue, pairs, qs = inputs.catalogue, inputs.pairs, inputs.questions
    loaded, builder, patches = load_setup(model, spec, inputs, device, dtype)
    timings["load"] = time.perf_counter() - t0
    option_ids = builder.option_ids()
    answers = np.array([q.answer_index for q in qs])

    # prompts first: every error about personas or alignment surfaces before any compute
    aligned, skipped = align_pairs(builder, pairs, qs, spec)

    engine = PatchingEngine(loaded.model, loaded.anatomy, chunk_rows=chunk_rows, packed=packed)
    bar = progress_bar(len(aligned) * len(qs), "patching", progress)
    t1 = time.perf_counter()
    plan = None
    estimates: dict[PersonaPair, np.ndarray] = {}
    if spec.budget_minutes is not None:
        reserve = persona_pass_seconds(loaded, builder, inputs, qs, spec)
        runs, estimates, plan = patch_within_budget(
            loaded, engine, aligned, patches, option_ids, spec.budget_minutes * 60,
            lambda chosen: exact_runs(engine, aligned, chosen, option_ids, bar),
            reserve_s=reserve)
    else:
        chosen = dict.fromkeys(aligned, patches)
        if spec.screen == "atp":
            estimates = screen_pairs(loaded, aligned, patches, option_ids)
            chosen = {pair: top_k(patches, estimates[pair], spec.exact_top_k)
                      for pair in aligned}
        runs = exact_runs(engine, aligned, chosen, option_ids, bar)
    screens = [screen_rows(pair, patches, estimates[pair]) for pair in estimates]
    bar.close()
    timings["patching"] = time.perf_counter() - t1

    scores = score_table(runs, spec)
    screen = screen_table(screens, scores)

    t2 = time.perf_counter()
    persona_logits, per_question = persona_rows(loaded, builder, inputs, qs, spec, progress)
    masses = {persona: mean_mass(m) for persona, m in per_question.items()}
    timings["behaviour_attention"] = time.perf_counter() - t2

    behaviour = behaviour_table(persona_logits, answers, catalogue, pairs)
    pairs_frame = pair_table(aligned, runs, persona_logits, answers)
    attention = attention_frame(masses, catalogue, pairs) if masses else empty_attention()
    timings["total"] = time.perf_counter() - t0

    meta = audit_meta(spec, inputs, loaded, builder, patches, skipped, engine, chunk_rows)
    meta["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    meta["completed_at"] = pd.Timestamp.now(tz="UTC").isoformat()
    meta["noise_floor"] = floor_statement(pairs_frame)
    prompts = [prompt_record(pair, ap, option_ids, int(answers[i]))
               for pair, aps in aligned.items() for i, ap in enumerate(aps)]
    if not screen.empty:
        meta["screen_agreement"] = screen_agreement(screen)
    if plan is not None:
        meta["plan"] = plan.to_dict()
    return AuditResult(scores, attention, behaviour, pairs_frame, meta, prompts, screen)


def exact_runs(engine, aligned: dict[PersonaPair, list], chosen: dict[PersonaPair, list],
            option_ids, bar) -> dict[PersonaPair, PairScores]:
    """Exact patching of each pair's `chosen` patches on its questions, queued as one stream
    across pairs (`engine.run_many`: packed batches of many prompt pairs on a GPU, each read
    back only once the next is queued), so the host never waits for the device between
    pairs."""
    chosen = {pair: patches for pair, patches in chosen.items() if patches}
    n = sum(len(aligned[pair]) for pair in chosen)
    if bar.n + n > bar.total:  # a plan's second pass
        bar.total = bar.n + n
    from governance.patching.packed import Item

    order = [(pair, ap) for pair in chosen for ap in aligned[pair]]
    items = [Item(ap.clean_ids, ap.corrupt_ids, ap.identity, chosen[pair]) for pair, ap in order]
    queued = zip((pair for pair, _ in order), engine.run_many(items, option_ids), strict=True)
    out: dict[PersonaPair, tuple[list, list, list]] = {pair: ([], [], []) for pair in chosen}
    for pair, run in queued:
        clean, corrupt, patched = out[pair]
        clean.append(run.clean.cpu().numpy())
        corrupt.append(run.corrupt.cpu().numpy())
        patched.append(run.patched.cpu().numpy())
        bar.update(1)
    return {pair: PairScores(list(chosen[pair]), np.stack(p, axis=1), np.stack(c), np.stack(k))
            for pair, (c, k, p) in out.items()}



def load_setup(model: Any, spec: AuditSpec, inputs: Inputs, device: str | None,
               dtype: str | None) -> tuple[Any, Any, list]:
    """The loaded model (`model` as given when already loaded; a pinned asset's name such as
    `smollm2-135m-instruct` is fetched and converted once), the prompt builder of `spec` for
    its tokenizer and every patch of the spec's sweeps."""
    from governance.models.loading import LoadedModel, load_model, resolve_model

    loaded = model if isinstance(model, LoadedModel) else load_model(
        resolve_model(os.fspath(model)), device=device, dtype=dtype)
    return (loaded, *prompt_setup(loaded, spec, inputs.catalogue))


def prompt_setup(loaded, spec: AuditSpec, catalogue) -> tuple[Any, list]:
    """The prompt builder of `spec` for `loaded`'s tokenizer, and every patch of its sweeps."""
    from governance.inputs.prompts import PromptBuilder, PromptFormat
    from governance.patching.engine import sweep

    fmt = PromptFormat(catalogue.instruction(spec.instruction), spec.answer_prefix,
                       spec.alignment, spec.alignment_filler)
    try:
        patches = sweep(loaded.anatomy, spec.sweeps, spec.layers)
    except ValueError as exc:
        raise ConfigError(f"spec layers: {exc}") from exc
    return PromptBuilder(loaded.tokenizer, fmt), patches


def align_pairs(builder, pairs: list[PersonaPair], qs: list[Question], spec: AuditSpec
                ) -> tuple[dict[PersonaPair, list], list[dict[str, str]]]:
    """Aligned prompts per pair; with `alignment: refuse`, pairs of unequal token length are
    skipped (with the reason) and the rest go on. No pair left is an error."""
    aligned: dict[PersonaPair, list] = {}
    skipped: list[dict[str, str]] = []
    for pair in pairs:
        try:
            aligned[pair] = [builder.pair(pair.clean.phrase, pair.corrupt.phrase, q) for q in qs]
        except PromptError as exc:
            if spec.alignment == "refuse" and "differ in token length" in str(exc):
                skipped.append({"pair": pair.label, "reason": str(exc)})
                log.warning("skipping pair %s: %s", pair.label, exc)
                continue
            raise
    if not aligned:
        raise PromptError("no persona pair could be aligned; see the reasons above: "
                          + "; ".join(s["reason"] for s in skipped))
    return aligned, skipped


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="prompt", leave=False)


def persona_rows(loaded, builder, inputs: Inputs, qs: list[Question], spec: AuditSpec,
                 progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each persona's own prompt (and the no-persona prompt) on the questions `qs`: option
    logits (question, option) and, if asked, identity mass per question (question, layer,
    head). Kept per question so that question shards merge exactly (`mean_mass`)."""
    from governance.patching.attention import eager_attention

    personas = involved_personas(inputs.pairs, inputs.catalogue)
    option_ids = list(builder.option_ids())
    logits: dict[str, np.ndarray] = {}
    masses: dict[str, np.ndarray] = {}
    bar = progress_bar((len(personas) + 1) * len(qs), "personas", progress)
    with eager_attention(loaded.model) if spec.attention else nullcontext():
        for persona in [NO_PERSONA, *personas]:
            rows, mass_rows = [], []
            if _batched(loaded, spec, persona):
                for out in _batched_logits(loaded, [_ids(builder, persona, q) for q in qs]):
                    rows.append(out[option_ids].cpu().numpy())
                bar.update(len(qs))
            else:
                for q in qs:
                    out, mass = _persona_forward(loaded, builder, persona, q, spec.attention)
                    if mass is not None:
                        mass_rows.append(mass)
                    rows.append(out[option_ids].cpu().numpy())
                    bar.update(1)
            logits[persona] = np.stack(rows)
            if mass_rows:
                masses[persona] = np.stack(mass_rows)
    bar.close()
    return logits, masses


PERSONA_BATCH = 16  # prompts of one forward in the persona pass on a GPU


def _batched(loaded, spec: AuditSpec, persona: str) -> bool:
    """Whether a persona's prompts run in right-padded batches: on a GPU, where one prompt
    alone leaves it idle, unless attention is read (one prompt at a time, eager). On a CPU
    one at a time, so that question shards merge bit for bit."""
    return loaded.device.type == "cuda" and not (spec.attention and persona != NO_PERSONA)


def _encode(builder, persona: str, q: Question):
    """The prompt of `persona` (none for `NO_PERSONA`) on question q."""
    return builder.encode(None if persona == NO_PERSONA else persona, q)


def _ids(builder, persona: str, q: Question) -> list[int]:
    return list(_encode(builder, persona, q).ids)


def _batched_logits(loaded, prompts: list[list[int]]) -> Iterator[Any]:
    """Last logits (vocab,) of each prompt, `PERSONA_BATCH` at a time, right-padded: under
    causal attention a prompt's tokens never see the padding after them."""
    import torch

    from governance.patching.sites import last_logits

    for start in range(0, len(prompts), PERSONA_BATCH):
        chunk = prompts[start : start + PERSONA_BATCH]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, : len(p)] = torch.tensor(p)
        with torch.inference_mode():
            out = last_logits(loaded.model, ids.to(loaded.device), cache=True,
                              positions=[len(p) - 1 for p in chunk])
        yield from out.float()


def _persona_forward(loaded, builder, persona: str, q: Question, attention: bool):
    """One persona prompt (the no-persona prompt for `NO_PERSONA`): its last logits (vocab,)
    and, with `attention` and a persona, its identity mass (layer, head), else None."""
    import torch

    from governance.patching.attention import forward_with_attention
    from governance.patching.sites import last_logits

    prompt = _encode(builder, persona, q)
    if attention and persona != NO_PERSONA:
        return forward_with_attention(loaded.model, prompt.ids, prompt.identity)
    with torch.inference_mode():
        ids = torch.tensor([list(prompt.ids)], device=loaded.device)
        return last_logits(loaded.model, ids)[0].float(), None


def persona_pass_seconds(loaded, builder, inputs: Inputs, qs: list[Question],
                         spec: AuditSpec) -> float:
    """What `persona_rows` will take, estimated before patching (an audit plan keeps it out
    of the patching budget): a persona's prompts on a few questions, timed after a warm-up
    and read back, per prompt, times the prompts the pass runs."""
    from governance.patching.attention import eager_attention

    personas = involved_personas(inputs.pairs, inputs.catalogue)
    persona = next(iter(personas), NO_PERSONA)
    sample = qs[:: max(1, len(qs) // PERSONA_BATCH)][:PERSONA_BATCH]

    def one_pass() -> float:
        t = time.perf_counter()
        if _batched(loaded, spec, persona):
            for out in _batched_logits(loaded, [_ids(builder, persona, q) for q in sample]):
                out.cpu()
            return (time.perf_counter() - t) / len(sample)
        for q in sample[:3]:
            _persona_forward(loaded, builder, persona, q, spec.attention)[0].cpu()
        return (time.perf_counter() - t) / len(sample[:3])

    with eager_attention(loaded.model) if spec.attention else nullcontext():
        one_pass()  # warm-up
        per_prompt = one_pass()
    return per_prompt * (len(personas) + 1) * len(qs)


def mean_mass(per_question: np.ndarray) -> np.ndarray:
    """The mean identity mass over questions, summed in question order: the same float
    arithmetic whether the questions ran in one process or were merged from shards."""
    acc = per_question[0]
    for m in per_question[1:]:
        acc = acc + m
    return acc / len(per_question)


def prompt_record(pair: PersonaPair, ap, option_ids, answer: int) -> dict[str, Any]:
    """One aligned prompt pair as `prompts.jsonl` stores it: enough to recompute its scores."""
    return {
        "question_id": ap.question_id, "clean_persona": pair.clean.phrase,
        "corrupt_persona": pair.corrupt.phrase, "category": pair.category,
        "clean_ids": list(ap.clean_ids), "corrupt_ids": list(ap.corrupt_ids),
        "identity_positions": list(ap.identity), "padded": ap.padded, "n_filler": ap.n_filler,
        "option_ids": list(option_ids), "answer_index": answer,
    }


def audit_meta(spec: AuditSpec, inputs: Inputs, loaded, builder, patches: list,
               skipped: list[dict[str, str]], engine, chunk_rows: int | None) -> dict[str, Any]:
    """What `audit.json` says of the audit before its timings and results: the spec and its
    hash, the inputs, the model, the prompt format and how the engine ran."""
    return {
        "spec": spec.model_dump(mode="json"),
        "spec_sha256": spec_hash(spec, inputs.catalogue, inputs.questions_sha256),
        "catalogue": inputs.catalogue.to_dict(),
        "questions_sha256": inputs.questions_sha256,
        "question_ids": [q.id for q in inputs.questions],
        "model": loaded.identity,
        "option_token_ids": list(builder.option_ids()),
        "option_tokens": [loaded.tokenizer.decode([i]) for i in builder.option_ids()],
        "uses_chat_template": builder.uses_chat_template,
        "n_patches_per_prompt": len(patches),
        "skipped_pairs": skipped,
        "versions": _versions(),
        "run": {"chunk_rows": chunk_rows, "fused_layers": engine.fused is not None,
                "compiled_kernels": engine.fused is not None and engine.fused.compiled,
                "packed_batches": engine.packed is not None},
    }
