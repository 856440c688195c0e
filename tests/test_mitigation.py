"""The mitigation what-if on tiny models: ablation against a slow obvious reference, a planted
head whose ablation removes the planted persona effect (and random heads that do not), the
held-out split, the demo's planted change, and clear errors."""

import copy

import pandas as pd
import pytest
import torch

from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.errors import ConfigError
from governance.mitigation import MitigationResult, MitigationSpec, run_mitigation
from governance.mitigation.ablation import ablated_logits, sites_of, zero_values
from governance.mitigation.selection import heldout_split, rank_components
from governance.mitigation.spec import Component
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model, tiny_questions
from governance.patching.sites import last_logits

from support.audits import plant_only

PAIRS = [("a Black person", "a White person")]
AUDIT = AuditSpec(n_questions=4, pairs=PAIRS, components=("head:all",), bootstrap=50,
                  attention=False)
PLANTED = (2, 1)
POOL = tiny_questions(16)  # the audit runs on q0..q3; the rest are held out


def _loaded(tokenizer, **kw):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4, **kw)
    return LoadedModel.from_model(model, tokenizer, "tiny-llama")


def _plant_only(loaded, planted=PLANTED):
    """Only head `planted` writes into the residual stream."""
    return plant_only(loaded, planted)


@pytest.fixture(scope="module")
def planted(tokenizer):
    loaded = _plant_only(_loaded(tokenizer))
    audit = run_audit(loaded, AUDIT, questions=POOL[:4], progress=False)
    spec = MitigationSpec(top_k=(1, 2), n_heldout=6, random_seeds=(0, 1, 2, 3), bootstrap=100)
    return loaded, audit, run_mitigation(loaded, audit, spec, questions=POOL, progress=False)


def _at(curve, selection, k, column="shift"):
    """One condition's value from a curve table (random rows are per seed: not used here)."""
    row = curve[(curve["selection"] == selection) & (curve["k"] == k)]
    assert len(row) == 1
    return float(row[column].iloc[0])


def _reference(loaded, ids, components, values, option_ids):
    """One plain forward; each component replaced by its own hook, one at a time."""
    anatomy = loaded.anatomy
    handles = []

    def head_hook(head, value):
        def hook(module, args):
            x = args[0].clone()  # (1, pos, head * d_head)
            cols = slice(head * anatomy.head_dim, (head + 1) * anatomy.head_dim)
            x[..., cols] = value
            return (x, *args[1:])
        return hook

    def out_hook(value):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (torch.zeros_like(output[0]) + value, *output[1:])
            return torch.zeros_like(output) + value
        return hook

    try:
        for c in components:
            v = values[(c.component, c.layer)]
            if c.component == "head":
                handles.append(anatomy.o_proj(c.layer).register_forward_pre_hook(
                    head_hook(c.head, v[c.head])))
            else:
                module = anatomy.mlp(c.layer) if c.component == "mlp_out" else anatomy.attn(c.layer)
                handles.append(module.register_forward_hook(out_hook(v)))
        with torch.inference_mode():
            logits = last_logits(loaded.model, torch.tensor([list(ids)]))[0]
    finally:
        for h in handles:
            h.remove()
    return logits[list(option_ids)]


def test_ablation_matches_the_reference_and_nothing_changes_nothing(tokenizer):
    loaded = _loaded(tokenizer)
    anatomy = loaded.anatomy
    ids = tokenizer("You are a Black person. Which number is prime? The answer is")["input_ids"]
    options = [5, 6, 7, 8]
    rows = [(), (Component("head", 1, 2),),
            (Component("head", 0, 0), Component("head", 0, 3), Component("mlp_out", 2)),
            (Component("attn_out", 1), Component("head", 3, 1)), (Component("mlp_out", 0),)]
    sites = sites_of({c for r in rows for c in r})
    gen = torch.Generator().manual_seed(0)
    values = {s: torch.randn(v.shape, generator=gen)
              for s, v in zero_values(anatomy, sites, torch.device("cpu")).items()}
    got = ablated_logits(loaded.model, anatomy, ids, rows, values, options, chunk_rows=2)
    assert got.shape == (len(rows), len(options))
    with torch.inference_mode():
        plain = last_logits(loaded.model, torch.tensor([ids]))[0][options]
    # the empty set is the unablated model (to float rounding of a batched matmul)
    torch.testing.assert_close(got[0], plain, atol=1e-6, rtol=1e-6)
    for r, components in enumerate(rows):
        want = _reference(loaded, ids, components, values, options)
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
    assert (got[1:] - got[0]).abs().max() > 1e-3  # the ablations did change something


def test_zero_ablating_a_head_equals_zeroing_its_weights(tokenizer):
    loaded = _loaded(tokenizer)
    anatomy = loaded.anatomy
    ids = tokenizer("You are a man. What is the capital of France? The answer is")["input_ids"]
    head = Component("head", 2, 3)
    got = ablated_logits(loaded.model, anatomy, ids, [(head,)],
                         zero_values(anatomy, sites_of([head]), torch.device("cpu")), [5, 6, 7, 8])
    cut = copy.deepcopy(loaded.model)
    with torch.no_grad():
        cols = slice(3 * anatomy.head_dim, 4 * anatomy.head_dim)
        cut.model.layers[2].self_attn.o_proj.weight[:, cols] = 0.0
        want = last_logits(cut, torch.tensor([ids]))[0][[5, 6, 7, 8]]
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_planted_head_is_flagged_and_its_ablation_removes_the_persona_effect(planted):
    _, _, result = planted
    sel = result.selections
    top = sel[(sel["selection"] == "flagged") & (sel["order"] == 1)].iloc[0]
    assert (int(top["layer"]), int(top["head"])) == PLANTED
    assert _at(result.curve, "none", 0) > 1e-2  # the persona moves the answers there...
    for k in (1, 2):
        assert _at(result.curve, "flagged", k) < 1e-6  # ...and nowhere else
    effects = result.effects
    shift = effects[(effects["metric"] == "shift") & (effects["selection"] == "flagged")
                    & (effects["kind"] != "noise_floor")]
    assert (shift["delta_high"] < 0).all()  # the drop's interval excludes zero


def test_random_heads_do_not_remove_it(planted):
    """The control: random sets without the planted head leave the shift exactly as it was
    (every other head writes nothing); sets that happen to hold it remove it."""
    _, _, result = planted
    sel = result.selections
    rand = result.curve[result.curve["selection"] == "random"]
    assert rand["seed"].nunique() == 4
    without, with_ = 0, 0
    for r in rand.itertuples():
        drawn = sel[(sel["selection"] == "random") & (sel["seed"] == r.seed)
                    & (sel["order"] <= r.k)]
        hit = ((drawn["layer"] == PLANTED[0]) & (drawn["head"] == PLANTED[1])).any()
        if hit:
            with_ += 1
            assert r.shift < 1e-6
        else:
            without += 1
            assert r.shift_ratio == pytest.approx(1.0, abs=1e-5)
    assert without >= 4  # the control measured something other than the planted head
    vs = result.flagged_vs_random()
    assert (vs["flagged_shift_ratio"] < vs["random_shift_ratio"]).all()


def test_heldout_split_is_recorded_and_disjoint(planted, tmp_path):
    _, audit, result = planted
    split = result.meta["split"]
    ranking, heldout = set(split["ranking_question_ids"]), set(split["heldout_question_ids"])
    assert ranking == set(audit.meta["question_ids"]) and len(heldout) == 6
    assert not ranking & heldout
    assert (result.effects["n_questions"] == 6).all()
    back = MitigationResult.load(result.save(tmp_path / "m"))
    assert back.meta["split"] == split
    pd.testing.assert_frame_equal(back.curve, result.curve, check_dtype=False)
    pd.testing.assert_frame_equal(back.selections, result.selections, check_dtype=False)


def test_too_few_heldout_questions_say_so(caplog):
    pool = tiny_questions(10)
    ids = [q.id for q in pool[:4]]
    split = heldout_split(pool, ids, n=20, seed=0)
    assert len(split.heldout) == 6 and split.record()["n_heldout_requested"] == 20
    assert "only 6 held-out questions remain" in caplog.text
    with pytest.raises(ConfigError, match="only 2 question"):
        heldout_split(tiny_questions(6), ids, n=20, seed=0)


def test_audit_without_head_scores_is_refused(planted):
    _, audit, _ = planted
    no_heads = audit.scores.assign(component="mlp_out", head=pd.NA)
    with pytest.raises(ConfigError, match="no scores for \\['head'\\]"):
        rank_components(no_heads, audit.pairs, MitigationSpec())
    with pytest.raises(ConfigError, match="top_k 99 is more than the 16"):
        run_mitigation(planted[0], audit, MitigationSpec(top_k=(99,)), questions=POOL,
                       progress=False)
    with pytest.raises(ConfigError, match="method"):
        MitigationSpec.make(method="prune")


@pytest.mark.parametrize("method", ["zero", "resample"])
def test_other_methods_remove_the_planted_effect_too(planted, method):
    loaded, audit, _ = planted
    spec = MitigationSpec(top_k=(1,), method=method, n_heldout=5, random_seeds=(0,),
                          bootstrap=0)
    result = run_mitigation(loaded, audit, spec, questions=POOL, progress=False)
    assert _at(result.curve, "none", 0) > 1e-2
    assert _at(result.curve, "flagged", 1) < 1e-6
    assert len(result.meta["resampled_ranking_index"]) == (5 if method == "resample" else 0)


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_ablating_the_demo_plant_moves_v2_back_toward_v1(tokenizer, method):
    """persona-demo's change (jobs.demo.Plant: one head's output scaled up) on a tiny model:
    switching off the head the v2 audit flags moves v2's persona shift toward v1's, and with
    that head off in both versions what the plant changed is gone (exactly, with zero
    ablation: the versions differ only in that head's weights)."""
    from jobs.demo import Plant

    v1 = _loaded(tokenizer)
    v2 = copy.deepcopy(v1)
    Plant(layer=PLANTED[0], head=PLANTED[1], scale=8.0).apply(v2)
    spec = MitigationSpec(top_k=(1,), n_heldout=8, random_seeds=(0,), bootstrap=0,
                          method=method)
    audit = run_audit(v2, AUDIT, questions=POOL[:4], progress=False)
    on_v2 = run_mitigation(v2, audit, spec, questions=POOL, progress=False)
    on_v1 = run_mitigation(v1, audit, spec, questions=POOL, progress=False)
    top = on_v2.selections.query("selection == 'flagged' and order == 1").iloc[0]
    assert (int(top["layer"]), int(top["head"])) == PLANTED
    v1_shift, v1_off = _at(on_v1.curve, "none", 0), _at(on_v1.curve, "flagged", 1)
    v2_shift, v2_off = _at(on_v2.curve, "none", 0), _at(on_v2.curve, "flagged", 1)
    assert v2_shift - v1_shift > 1e-2  # the plant amplified the persona shift...
    assert v2_off < v1_shift < v2_shift  # ...switching the head off undoes that and more
    gap = abs(v2_off - v1_off)
    assert gap < (1e-6 if method == "zero" else v2_shift - v1_shift)


def test_report_page_has_the_what_if_section(planted, tmp_path):
    from governance.report.page import render_report

    _, audit, result = planted
    page = render_report(audit, tmp_path / "report.html", mitigation=result).read_text()
    assert "<h2>Mitigation what-if</h2>" in page
    assert f"L{PLANTED[0]}.H{PLANTED[1]}" in page  # the flagged head, in the selections table
    assert (tmp_path / "report_mitigation.png").stat().st_size > 1000
    assert "Mitigation what-if" not in render_report(audit, tmp_path / "plain.html").read_text()
