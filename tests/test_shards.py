"""Question shards: shards merged equal one run of the audit, bit for bit (fp32, CPU)."""

from __future__ import annotations

import pandas as pd
import pytest

from governance.audit.result import AuditResult
from governance.audit.shards import AuditPartial, Shard, choose_patches, merge, run_shard
from governance.errors import ConfigError, GovernanceError

from support.audits import TINY_SOURCE, TINY_SPEC, run_tiny_audit

# meta that must agree between the merged audit and one run (timings and time stamps differ)
SAME_META = ("spec", "spec_sha256", "catalogue", "questions_sha256", "question_ids",
             "option_token_ids", "option_tokens", "uses_chat_template", "n_patches_per_prompt",
             "skipped_pairs", "noise_floor")


@pytest.fixture(scope="module")
def loaded(tokenizer):
    from governance.models.loading import LoadedModel
    from governance.models.tiny import tiny_model

    # the model run_tiny_audit builds (seed 0), so the shared tiny_audit is its one-run audit
    return LoadedModel.from_model(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer,
                                  TINY_SOURCE)


@pytest.fixture(scope="module")
def questions():
    from governance.models.tiny import tiny_questions

    return tiny_questions()


def _shards(loaded, spec, questions, count, **kw) -> list[AuditPartial]:
    # each through bytes, as a shard comes back from a worker
    return [AuditPartial.from_bytes(run_shard(loaded, spec, Shard(i, count), questions=questions,
                                              progress=False, **kw).to_bytes())
            for i in range(count)]


def assert_same_audit(merged: AuditResult, one: AuditResult) -> None:
    for name in (*AuditResult.TABLES, "screen"):
        pd.testing.assert_frame_equal(getattr(merged, name), getattr(one, name),
                                      check_exact=True, obj=name)
    for key in SAME_META:
        assert merged.meta[key] == one.meta[key], key
    assert merged.meta["model"]["weights_fingerprint"] == one.meta["model"]["weights_fingerprint"]
    assert merged.meta.get("screen_agreement") == one.meta.get("screen_agreement")
    assert merged.prompts == one.prompts


def test_two_shards_merge_to_one_run_bit_for_bit(loaded, questions, tiny_audit):
    parts = _shards(loaded, TINY_SPEC, questions, 2)
    assert [p.positions for p in parts] == [[0, 2, 4], [1, 3, 5]]
    merged = merge(parts[::-1])  # the order shards come back in does not matter
    assert merged.meta["run"]["shards"] == 2
    assert len(merged.scores) and len(merged.attention) and merged.scores["score"].notna().all()
    assert_same_audit(merged, tiny_audit)


def test_screened_shards_patch_what_the_screen_chose_on_all_questions(tokenizer, loaded,
                                                                       questions):
    spec = TINY_SPEC.with_overrides(screen="atp", exact_top_k=2, bootstrap=50, attention=False,
                                    components=("mlp_out:identity", "head:last"))
    one = run_tiny_audit(tokenizer, spec, TINY_SOURCE)
    with pytest.raises(ConfigError, match="screen runs once"):
        run_shard(loaded, spec, Shard(0, 2), questions=questions, progress=False)
    screen = choose_patches(loaded, spec, inputs=_inputs(spec, questions))
    chosen = {label: c.chosen for label, c in screen.items()}
    merged = merge(_shards(loaded, spec, questions, 3, chosen=chosen), screen=screen)
    assert merged.scores.groupby(["clean_persona", "component"]).size().max() == 2
    assert_same_audit(merged, one)


def _inputs(spec, questions):
    from governance.audit.spec import prepare

    return prepare(spec, questions)


def test_merge_refuses_shards_of_different_audits(loaded, questions):
    spec = TINY_SPEC.with_overrides(components=("attn_out:last",), attention=False, bootstrap=10)
    parts = _shards(loaded, spec, questions, 2)
    with pytest.raises(GovernanceError, match="not each of 2 shards"):
        merge(parts[:1])
    with pytest.raises(GovernanceError, match="not each of 2 shards"):
        merge([parts[0], parts[0]])
    other = run_shard(loaded, spec.with_overrides(seed=1), Shard(1, 2), questions=questions,
                      progress=False)
    with pytest.raises(GovernanceError, match="differs from shard 1/2 in spec_sha256"):
        merge([parts[0], other])
    with pytest.raises(GovernanceError, match="not an audit shard"):
        AuditPartial.from_bytes(b"not a zip")


@pytest.mark.parametrize("index, count, match", [
    (2, 2, "index must be in 0..1"), (0, 0, "positive integer"), (-1, 3, "index"),
])
def test_shard_refuses_bad_numbers(index, count, match):
    with pytest.raises(ConfigError, match=match):
        Shard(index, count)


def test_more_shards_than_questions_is_refused():
    with pytest.raises(ConfigError, match="at most 3 shards"):
        Shard(0, 4).positions(3)



def test_budgeted_shards_patch_the_plans_first_choice(loaded, questions, monkeypatch):
    # with budget_minutes the plan's first pass (for as many devices as shards) picks the
    # exact patches once, here under a budget too small for more than the minimum per sweep
    # (lowered to one, so that the tiny model's sweeps are not verified whole); every shard
    # patches exactly those
    import governance.audit.plan as plan_module

    monkeypatch.setattr(plan_module, "MIN_K", 1)
    spec = TINY_SPEC.with_overrides(screen="atp", budget_minutes=1e-4, bootstrap=10,
                                    attention=False, components=("mlp_out:identity",
                                                                 "head:last"))
    screen = choose_patches(loaded, spec, inputs=_inputs(spec, questions), workers=2)
    chosen = {label: c.chosen for label, c in screen.items()}
    for choice in screen.values():
        sweeps = {(p.component, p.positions) for p in choice.chosen}
        assert sweeps == {("mlp_out", "identity"), ("head", "last")}
        assert len(choice.chosen) < len(choice.patches)
    merged = merge(_shards(loaded, spec, questions, 2, chosen=chosen), screen=screen)
    got = sorted(merged.scores.groupby(["clean_persona", "corrupt_persona"]).size())
    assert got == sorted(len(c.chosen) for c in screen.values())
