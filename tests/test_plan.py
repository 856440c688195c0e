"""The audit plan within a budget: the cost model, choosing k, widening, and the record of an
audit run under a budget (audit.json and the report page)."""

import json
import math

import numpy as np
import pytest

from governance.audit import plan as plan_module
from governance.audit.plan import (
    Calibration,
    ModelShape,
    PromptShape,
    choose,
    cost_of,
    fit_k,
    flops_table,
    low_agreement,
    patch_flops,
    ranked,
    verified_agreement,
    widen,
)
from governance.audit.result import AuditResult
from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.errors import ConfigError
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model, tiny_questions
from governance.patching.engine import Patch, sweep

SHAPE = ModelShape(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def _patches():
    from types import SimpleNamespace

    anatomy = SimpleNamespace(n_layers=4, n_heads=4)
    return sweep(anatomy, [("head", "all"), ("mlp_out", "identity"), ("attn_out", "last")])


def test_patch_flops_fall_with_layer_and_later_begin():
    early, late = Patch("mlp_out", 0, "all"), Patch("mlp_out", 3, "all")
    assert patch_flops(SHAPE, early, 40, 0) > patch_flops(SHAPE, late, 40, 0)
    assert patch_flops(SHAPE, early, 40, 0) > patch_flops(SHAPE, early, 40, 39)
    prompts = [PromptShape(40, {"all": 0, "identity": 5, "last": 39})] * 3
    table = flops_table(SHAPE, [early, late], prompts)
    assert table[0] == pytest.approx(3 * patch_flops(SHAPE, early, 40, 0))
    assert table[1] == pytest.approx(3 * patch_flops(SHAPE, late, 40, 0))


def _setup(n_pairs=3, seed=0):
    patches = _patches()
    rng = np.random.default_rng(seed)
    prompts = [PromptShape(40, {"all": 0, "identity": 5, "last": 39})] * 4
    labels = [f"p{i}" for i in range(n_pairs)]
    order = {label: ranked(patches, rng.normal(size=len(patches))) for label in labels}
    flops = {label: flops_table(SHAPE, patches, prompts) for label in labels}
    return patches, order, flops


@pytest.mark.parametrize("seconds", [0.5, 1.5, 5.0])
def test_fit_k_respects_the_budget_and_uses_it(seconds, monkeypatch):
    """The chosen k fits the budget under the cost model, and no sweep could take one more
    (with a floor of one per sweep, so that small budgets bind)."""
    monkeypatch.setattr(plan_module, "MIN_K", 1)
    patches, order, flops = _setup()
    cal = Calibration(overhead_s=0.001, seconds_per_flop=1e-8, seconds=0.0)
    k = fit_k(order, flops, 4, cal, seconds, floor="p2")
    assert cost_of(choose(order, k, "p2"), flops, 4, cal) <= seconds
    sizes = {s: len(i) for s, i in order["p0"].items()}
    for s in k:
        if k[s] < sizes[s]:
            more = {**k, s: k[s] + 1}
            assert cost_of(choose(order, more, "p2"), flops, 4, cal) > seconds


def test_fit_k_keeps_the_top_ten_of_every_sweep_whatever_the_budget():
    _, order, flops = _setup()
    k = fit_k(order, flops, 4, Calibration(1.0, 1.0, 0.0), 0.0, floor="p2")
    assert k == {"head:all": 10, "mlp_out:identity": 4, "attn_out:last": 4}


def test_floor_pair_is_verified_where_any_persona_pair_was():
    _, order, _ = _setup()
    chosen = choose(order, {"head:all": 2, "mlp_out:identity": 1, "attn_out:last": 1}, "p2")
    assert set(chosen["p0"]) | set(chosen["p1"]) <= set(chosen["p2"])
    assert len(chosen["p0"]) == 4


def test_low_agreement_and_widening():
    patches = _patches()
    heads = [i for i, p in enumerate(patches) if p.component == "head"]
    mlps = [i for i, p in enumerate(patches) if p.component == "mlp_out"]
    estimate = np.zeros(len(patches))
    estimate[heads] = np.arange(len(heads))  # heads: ranked like the exact scores
    estimate[mlps] = -np.arange(len(mlps))  # mlp: the reverse
    exact = {i: float(estimate[i]) for i in heads[:6]}
    exact.update({i: float(i) for i in mlps})
    agree = verified_agreement({"p0": estimate}, {"p0": exact}, patches)
    assert agree["head:all"]["spearman"] == pytest.approx(1.0)
    assert agree["mlp_out:identity"]["spearman"] == pytest.approx(-1.0)
    assert low_agreement(agree) == ["mlp_out:identity"]
    # a sweep with one patch verified has unknown agreement: not trusted either
    one = verified_agreement({"p0": estimate}, {"p0": {heads[0]: 1.0}}, patches)
    assert math.isnan(one["head:all"]["spearman"]) and low_agreement(one) == ["head:all"]

    _, order, flops = _setup(n_pairs=1)
    cal = Calibration(0.0, 1e-8, 0.0)
    k = {"head:all": 2, "mlp_out:identity": 1, "attn_out:last": 1}
    wide = widen(order, flops, 4, cal, 1e9, None, k, ["head:all", "attn_out:last"])
    assert wide == {"head:all": 4, "mlp_out:identity": 1, "attn_out:last": 2}
    assert widen(order, flops, 4, cal, 0.0, None, k, ["head:all"]) == k  # no time left


def test_budget_needs_the_screen_and_excludes_top_k():
    with pytest.raises(ConfigError, match="budget_minutes needs `screen: atp`"):
        AuditSpec().with_overrides(budget_minutes=5)
    with pytest.raises(ConfigError, match="give one of them"):
        AuditSpec().with_overrides(budget_minutes=5, screen="atp", exact_top_k=3)


SPEC = AuditSpec(
    n_questions=4,
    pairs=[("a Black person", "a White person")],
    components=("head:all", "mlp_out:identity"),
    bootstrap=0, attention=False, screen="atp",
)


@pytest.fixture(scope="module")
def loaded(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return LoadedModel.from_model(model, tokenizer, "tiny-llama")


def test_large_budget_verifies_everything(loaded, tmp_path):
    """With time to spare every patch is exact; audit.json and the page carry the plan."""
    from governance.report.page import render_report

    spec = SPEC.model_copy(update={"budget_minutes": 30.0})
    result = run_audit(loaded, spec, questions=tiny_questions(4), progress=False)
    plan = result.meta["plan"]
    assert plan["k"] == plan["sweep_sizes"] == {"head:all": 12, "mlp_out:identity": 3}
    assert plan["skipped_patches"] == 0 and not plan["over_budget"]
    n_pairs = result.scores[["clean_persona", "corrupt_persona"]].drop_duplicates().shape[0]
    assert n_pairs == 2 and len(result.scores) == 2 * 15 == plan["exact_patches"]
    assert plan["estimated_exact_s"] > 0 and plan["actual_exact_s"] > 0
    result.save(tmp_path / "audit")
    stored = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert stored["plan"]["k"] == plan["k"]
    assert AuditResult.load(tmp_path / "audit").meta["plan"]["exact_flops"] > 0
    page = render_report(result, tmp_path / "page.html")
    text = page.read_text()
    assert "Audit plan: estimated and exact" in text and "head:all" in text


def test_tiny_budget_keeps_the_top_ten_per_sweep_and_says_it_ran_over(loaded):
    """Whatever the budget, each sweep's top `MIN_K` (10; all 3 of a 3-patch sweep) is
    verified; a budget that cannot afford them is reported as overrun."""
    spec = SPEC.model_copy(update={"budget_minutes": 1e-6})
    result = run_audit(loaded, spec, questions=tiny_questions(4), progress=False)
    plan = result.meta["plan"]
    assert plan["k"] == {"head:all": 10, "mlp_out:identity": 3} and plan["over_budget"]
    assert plan["thresholds"]["min_k"] == 10 and plan["reserved_s"] > 0
    assert plan["skipped_patches"] == 2 * 15 - plan["exact_patches"] > 0
    assert result.screen["exact"].notna().sum() == len(result.scores)


def test_low_agreement_widens_within_the_budget(loaded, monkeypatch):
    """A first pass of one patch per sweep leaves the screen's agreement unknown, so every
    sweep is widened (k doubled, pass after pass) until its screen is trusted on what was
    verified or the whole sweep is exact."""
    monkeypatch.setattr(plan_module, "FIRST_PASS_SHARE", 0.0)
    monkeypatch.setattr(plan_module, "MIN_K", 1)
    spec = SPEC.model_copy(update={"budget_minutes": 30.0, "noise_floor": False})
    result = run_audit(loaded, spec, questions=tiny_questions(4), progress=False)
    plan = result.meta["plan"]
    assert plan["k_first_pass"] == {"head:all": 1, "mlp_out:identity": 1}
    assert sorted(plan["widened"]) == ["head:all", "mlp_out:identity"]
    sizes = plan["sweep_sizes"]
    for name, k in plan["k"].items():
        a = plan["agreement"][name]
        assert k >= 2 and k in (1, 2, 4, 8, sizes[name])
        assert k == sizes[name] or (a["spearman"] >= plan_module.MIN_SPEARMAN
                                     and a["recall"] >= plan_module.MIN_RECALL)
    assert len(result.scores) == sum(plan["k"].values())
    assert {"spearman", "recall", "pairs"} <= set(plan["agreement"]["head:all"])


def test_first_pass_hands_each_pair_its_patches(loaded, aligned):
    """What question shards receive: every pair's chosen patches by label, planned once."""
    from governance.audit.plan import plan_first_pass
    from governance.inputs.personas import load_catalogue
    from governance.patching.engine import PatchingEngine

    catalogue = load_catalogue()
    pairs = {catalogue.pair("a physically-disabled person", "a human"): aligned}
    patches = sweep(loaded.anatomy, [("head", "all"), ("mlp_out", "identity")])
    engine = PatchingEngine(loaded.model, loaded.anatomy)
    options = loaded.tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])
    first = plan_first_pass(loaded, engine, pairs, patches, options, budget_s=1e6)
    chosen = first.chosen_patches(patches)
    assert list(chosen) == [next(iter(pairs)).label]
    assert sorted(chosen[next(iter(pairs)).label], key=patches.index) == patches
    assert first.k == {"head:all": 12, "mlp_out:identity": 3}
    with pytest.raises(ValueError, match="workers must be at least 1"):
        plan_first_pass(loaded, engine, pairs, patches, options, budget_s=1.0, workers=0)
