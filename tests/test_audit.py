"""run_audit end to end on tiny models: table shapes, a planted mechanism, stored prompts."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from governance.audit.result import BEHAVIOUR_COLUMNS, PAIR_COLUMNS, SCORE_COLUMNS, AuditResult
from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.errors import ConfigError, PromptError
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model, tiny_questions
from governance.patching.engine import Patch, PatchingEngine
from governance.patching.scores import restoration

from support.audits import plant_only

_questions = tiny_questions


def _loaded(tokenizer, model_type="llama", **kw):
    model = tiny_model(model_type, vocab_size=len(tokenizer), **kw)
    return LoadedModel.from_model(model, tokenizer, f"tiny-{model_type}")


SPEC = AuditSpec(
    n_questions=6,
    pairs=[("a Black person", "a White person"), ("a man", "a woman")],
    components=("resid_pre:identity", "mlp_out:all", "attn_out:last", "head:all", "head:last"),
    bootstrap=200,
)


@pytest.fixture(scope="module")
def result(tokenizer):
    return run_audit(_loaded(tokenizer), SPEC, questions=_questions(), progress=False)


def test_tables_have_method_columns(result):
    assert list(result.scores.columns) == SCORE_COLUMNS
    assert list(result.behaviour.columns) == BEHAVIOUR_COLUMNS
    assert list(result.pairs.columns) == PAIR_COLUMNS
    assert {"layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"} <= set(
        result.attention.columns)
    # 3 layers: (resid 1 + mlp 1 + attn 1 + 4 heads x 2) x 3 layers per pair; 3 pairs with floor
    assert len(result.scores) == 3 * 11 * 3
    assert set(result.pairs["kind"]) == {"extra", "noise_floor"}
    assert (result.scores["n_questions"] == 6).all()


def test_layer0_identity_restores_and_intervals_bracket(result):
    s = result.scores
    r0 = s[(s.component == "resid_pre") & (s.layer == 0)]
    np.testing.assert_allclose(r0["score"], 1.0, atol=1e-5)
    finite = s.dropna(subset=["ci_low", "ci_high"])
    assert len(finite) > 0
    assert (finite["ci_low"] <= finite["score"] + 1e-9).all()
    assert (finite["score"] <= finite["ci_high"] + 1e-9).all()


def test_behaviour_includes_baselines(result):
    b = result.behaviour.set_index("persona")
    assert "(no persona)" in b.index and "a human" in b.index
    assert b.loc["(no persona)", "delta"] == 0.0
    assert b.loc["a human", "delta_neutral"] == 0.0
    assert ((b["accuracy"] >= b["ci_low"]) & (b["accuracy"] <= b["ci_high"])).all()


def test_attention_masses_are_probabilities(result):
    a = result.attention
    assert ((a["identity_mass"] >= 0) & (a["identity_mass"] <= 1 + 1e-6)).all()
    control = a[a["persona"] == "a human"]
    np.testing.assert_allclose(control["ratio"].dropna(), 1.0)


def test_meta_records_hash_versions_and_floor(result):
    m = result.meta
    assert len(m["spec_sha256"]) == 64
    assert m["versions"]["torch"] == torch.__version__
    assert "noise floor" in m["noise_floor"]
    assert m["option_token_ids"] and len(m["option_token_ids"]) == 4
    # which engine path produced the scores: the fused layers (a llama), not compiled on a CPU
    assert m["run"]["fused_layers"] is True and m["run"]["compiled_kernels"] is False


def test_save_load_round_trip(result, tmp_path):
    result.save(tmp_path)
    back = AuditResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.scores, result.scores, check_dtype=False)
    assert back.meta["spec_sha256"] == result.meta["spec_sha256"]
    assert back.spec == SPEC


def test_score_recomputes_from_stored_prompts(result, tokenizer, tmp_path):
    """Anyone can recompute a score from prompts.jsonl alone."""
    result.save(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["clean_persona"] == "a man"]
    assert len(mine) == 6
    loaded = _loaded(tokenizer)
    engine = PatchingEngine(loaded.model, loaded.anatomy)
    patch = Patch("mlp_out", 1, "all")
    runs = [engine.run(r["clean_ids"], r["corrupt_ids"], r["identity_positions"], [patch],
                       r["option_ids"]) for r in mine]
    score = restoration(
        np.stack([r.patched.numpy() for r in runs], axis=1),
        np.stack([r.clean.numpy() for r in runs]),
        np.stack([r.corrupt.numpy() for r in runs]),
        n_boot=0,
    ).score[0]
    s = result.scores
    stored = s[(s.component == "mlp_out") & (s.layer == 1) & (s.clean_persona == "a man")]
    assert stored["score"].iloc[0] == pytest.approx(score, abs=1e-6)


def test_spec_hash_depends_on_content_not_paths(tokenizer):
    from governance.audit.spec import spec_hash
    from governance.inputs.personas import load_catalogue

    cat = load_catalogue()
    a = spec_hash(AuditSpec(questions="/a/x.jsonl"), cat, "abc")
    b = spec_hash(AuditSpec(questions="/b/y.jsonl"), cat, "abc")
    c = spec_hash(AuditSpec(questions="/a/x.jsonl", seed=1), cat, "abc")
    d = spec_hash(AuditSpec(questions="/a/x.jsonl"), cat, "abd")
    assert a == b and a != c and a != d


def test_planted_head_is_ranked_first(tokenizer):
    """Only head (2, 1) may write into the residual stream: it is the one path from the
    persona tokens to the last position, so exact patching must put it first with S = 1."""
    loaded = _loaded(tokenizer, num_hidden_layers=4)
    planted = (2, 1)
    plant_only(loaded, planted)
    spec = SPEC.model_copy(update={"components": ("head:all", "head:last", "mlp_out:identity"),
                                   "attention": False, "noise_floor": False})
    result = run_audit(loaded, spec, questions=_questions(), progress=False)
    heads = result.scores[result.scores.component == "head"]
    for positions in ("all", "last"):
        ranked = (heads[heads.positions == positions]
                  .groupby(["layer", "head"])["score"].mean().sort_values(ascending=False))
        assert ranked.index[0] == planted
        assert ranked.iloc[0] == pytest.approx(1.0, abs=1e-5)
        assert ranked.iloc[1:].abs().max() < 1e-5
    top = result.top_heads(1)
    assert (int(top["layer"].iloc[0]), int(top["head"].iloc[0])) == planted


def test_refused_alignment_skips_pair_with_reason(tokenizer):
    spec = SPEC.model_copy(update={
        "pairs": [("a physically-disabled person", "an able-bodied person"), ("a man", "a woman")],
        "alignment": "refuse", "noise_floor": False, "components": ("mlp_out:all",),
        "attention": False})
    result = run_audit(_loaded(tokenizer), spec, questions=_questions(3), progress=False)
    assert set(result.scores["clean_persona"]) == {"a man"}
    (skip,) = result.meta["skipped_pairs"]
    assert "differ in token length" in skip["reason"]


def test_an_explicit_pair_outside_the_catalogue_is_audited_as_ad_hoc(tokenizer):
    spec = SPEC.model_copy(update={"pairs": [("a wizard", "a man")], "attention": False})
    result = run_audit(_loaded(tokenizer), spec, questions=_questions(), progress=False)
    personas = dict(zip(result.behaviour["persona"], result.behaviour["category"], strict=True))
    assert personas["a wizard"] == "ad_hoc" and personas["a man"] == "gender"
    pair = result.pairs[result.pairs["kind"] == "extra"].iloc[0]
    assert (pair.clean_persona, pair.corrupt_persona, pair.category) == ("a wizard", "a man",
                                                                         "gender")


def test_empty_persona_and_missing_questions_are_clear_errors(tokenizer):
    loaded = _loaded(tokenizer)
    with pytest.raises(ConfigError, match="persona phrase must be non-empty"):
        run_audit(loaded, SPEC.model_copy(update={"pairs": [(" ", "a man")]}),
                  questions=_questions(), progress=False)
    with pytest.raises(ConfigError, match="no question set"):
        run_audit(loaded, AuditSpec(), progress=False)


def test_persona_missing_from_instruction_is_a_prompt_error(tokenizer, tmp_path):
    """A catalogue whose instruction hides the persona (the template drops the system
    text) cannot locate identity positions and must say so."""
    tok = type(tokenizer).from_pretrained(_save(tokenizer, tmp_path))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(PromptError, match="cannot locate"):
        run_audit(_loaded(tok), SPEC, questions=_questions(), progress=False)


def _save(tokenizer, path):
    tokenizer.save_pretrained(path)
    return path


def test_spec_yaml_errors_name_the_field(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("n_questions: -3\ncomponents: [mlp_out:sideways]\nfoo: 1\n")
    with pytest.raises(ConfigError) as err:
        AuditSpec.from_yaml(bad)
    text = str(err.value)
    assert "n_questions" in text and "components" in text and "foo" in text
    assert str(bad) in text


def test_atp_screen_then_exact_top_k(tokenizer):
    """The screen estimates every patch; exact patching runs on the top k of each sweep and
    the audit records the agreement on what both computed. The planted head leads both."""
    loaded = _loaded(tokenizer, num_hidden_layers=4)
    anatomy = loaded.anatomy
    with torch.no_grad():
        for layer in range(anatomy.n_layers):
            w = anatomy.o_proj(layer).weight
            for head in range(anatomy.n_heads):
                cols = slice(head * anatomy.head_dim, (head + 1) * anatomy.head_dim)
                w[:, cols] *= 4.0 if (layer, head) == (2, 1) else 0.0
    spec = SPEC.model_copy(update={"components": ("head:all", "mlp_out:identity"),
                                   "screen": "atp", "exact_top_k": 3, "attention": False,
                                   "noise_floor": False})
    result = run_audit(loaded, spec, questions=_questions(), progress=False)
    screen = result.screen
    assert len(screen) == 2 * (16 + 4)  # every patch estimated, for both pairs
    heads = result.scores[result.scores.component == "head"]
    assert len(heads) == 2 * 3  # exact only on the top 3 heads per pair
    assert screen["exact"].notna().sum() == len(result.scores)
    for _, group in screen[screen.component == "head"].groupby("clean_persona"):
        top = group.loc[group["estimate"].abs().idxmax()]
        assert (top["layer"], top["head"]) == (2, 1)
    agreement = result.meta["screen_agreement"]["head:all"]
    assert agreement["n"] == 6
    assert set(agreement) == {"n", "spearman", "recall_at_20"}


@pytest.mark.parametrize("estimate, spearman, recall", [
    ([4.0, 3.0, 2.0, 1.0, 0.0], 1.0, 1.0),   # same order
    ([0.0, 1.0, 2.0, 3.0, 4.0], -1.0, 0.0),  # reversed: the top 2 by |S| are missed
    ([4.0, 0.0, 2.0, 1.0, 3.0], 0.1, 0.5),   # one of the exact top 2 found
])
def test_screen_agreement_measures(estimate, spearman, recall):
    from governance.patching.attribution import agreement

    got = agreement(np.array(estimate), np.array([4.0, 3.0, 2.0, 1.0, 0.0]), k=2)
    assert got["spearman"] == pytest.approx(spearman)
    assert got["recall_at_2"] == recall
    assert got["n"] == 5


def test_results_are_read_back_one_question_behind():
    """The audit reads question k's results (a device sync on a GPU) only after question k+1
    is queued, and still yields every result once, in order."""
    from governance.patching.engine import one_ahead as _one_ahead

    produced = []

    def runs():
        for k in range(4):
            produced.append(k)
            yield k

    seen = []
    for k in _one_ahead(runs()):
        seen.append((k, list(produced)))
    assert [k for k, _ in seen] == [0, 1, 2, 3]
    assert [p for _, p in seen[:3]] == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert list(_one_ahead([])) == []
