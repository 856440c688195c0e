"""The benchmark script runs end to end on a tiny shape and its agreement checks hold (the
timings themselves are not tested: speed is proven by running the script, not by tests)."""

import argparse
import importlib.util
import math

import pytest
import torch

from benchmarks.patching import (
    cast,
    engine_flops,
    layer_flops,
    load,
    logit_tolerance,
    main,
    verdict,
)
from governance.patching.engine import sweep

TINY = ["--shape", "tiny", "--pairs", "2", "--tokens", "24", "--sweeps", "head:all",
        "mlp_out:last", "resid_pre:identity", "--warmup", "0"]
HAS_TL = importlib.util.find_spec("transformer_lens") is not None


def test_benchmark_runs_and_agrees_on_a_tiny_shape(capsys):
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "FAIL" not in out
    assert "engine on the model's own layers with hooks" in out


def test_low_precision_is_checked_against_float32(capsys):
    """In bfloat16 the engine, the loop and TransformerLens are each compared with the
    engine in float32 on the same patches, and the engine is no further from it."""
    assert main([*TINY, "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "error against the float32 reference: the engine (fused) in float32" in out
    table = out[out.index("error against the float32 reference"):].splitlines()

    def row(name, quantity):
        return next(line.rstrip() for line in table
                    if line.strip().startswith(name) and quantity in line)

    assert "pass:" in row("engine (fused)", "patched logits")
    assert "pass:" in row("engine (hooked)", "patched logits")
    assert row("TL-style loop", "patched logits").endswith("peer")
    if HAS_TL:
        assert "pass:" in row("engine (fused)", "head metric")
        assert row("TransformerLens", "head metric").endswith("peer")
    assert "slack: 2 x bfloat16 epsilon" in out and "FAIL" not in out


def test_an_engine_further_from_float32_fails_the_run(capsys):
    """The seam: an error added to the engine's bfloat16 logits must fail both comparisons."""
    assert main([*TINY, "--dtype", "bfloat16", "--skip-hooked"], engine_error=0.5) == 1
    err = capsys.readouterr().err
    assert "FAIL: engine (fused) vs float32 on the patched logits" in err
    assert ("FAIL: engine (fused) vs float32 on the head metric" in err) == HAS_TL


def test_verdict_holds_the_engine_to_the_worst_other_computation_plus_the_slack():
    engines = ["engine (fused)", "engine (hooked)"]
    errors = {"engine (fused)": 0.30, "engine (hooked)": 0.26, "TL-style loop": 0.25,
              "TransformerLens": 0.10}
    ok, marks = verdict(errors, engines, slack=0.05)
    assert ok and marks["TL-style loop"] == marks["TransformerLens"] == "peer"
    assert marks["engine (fused)"].startswith("pass: 3.00e-01 <= TL-style loop 2.50e-01")
    ok, marks = verdict(errors, engines, slack=0.04)
    assert not ok
    assert marks["engine (fused)"].startswith("FAIL: 3.00e-01 > TL-style loop 2.50e-01")
    assert marks["engine (hooked)"].startswith("pass")
    assert not verdict({"engine (fused)": math.nan, "TL-style loop": 1.0}, engines, 0.1)[0]
    assert verdict({"engine (fused)": 9.0}, engines, 0.0)[0]  # nothing to compare with


@pytest.mark.parametrize("dtype,to", [("bfloat16", torch.float32),
                                      ("float32", torch.bfloat16)])
def test_casting_for_the_reference_gives_the_model_back_exactly(dtype, to):
    """The rotary `inv_freq` a bfloat16 model keeps in float32, and float32 weights, come back
    unrounded after the model ran in another dtype."""
    args = argparse.Namespace(shape="tiny", pairs=1, tokens=24, device="cpu", dtype=dtype,
                              model=None)
    model = load(args)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before.update({k: b.clone() for k, b in model.named_buffers()})
    with cast(model, to):
        assert next(model.parameters()).dtype == to
    after = dict(model.state_dict())
    after.update(dict(model.named_buffers()))
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_flops_count_what_each_row_recomputes():
    """Fused: a last-position patch at the final layer costs keys/values of one position
    plus one query; an all-positions patch recomputes from the prompts' first difference."""
    args = argparse.Namespace(shape="tiny", pairs=1, tokens=24, device="cpu", dtype="float32",
                              model=None)
    model, anatomy, prompts, _ = load(args)
    config, t, L = model.config, 24, anatomy.n_layers
    base = 2 * L * layer_flops(anatomy, config, t, t)
    last = sweep(anatomy, [("mlp_out", "last")], layers=[L - 1])
    assert engine_flops(anatomy, config, prompts, last, fused=True) == pytest.approx(
        base + layer_flops(anatomy, config, 1, t, kv_tokens=1))
    everywhere = sweep(anatomy, [("mlp_out", "all")], layers=[0])
    q = t - 5  # the tiny prompts differ from position 5 on
    assert engine_flops(anatomy, config, prompts, everywhere, fused=True) == pytest.approx(
        base + (L - 1) * layer_flops(anatomy, config, q, t, q)
        + layer_flops(anatomy, config, 1, t, kv_tokens=q))


def test_low_precision_tolerance_scales_with_the_logits():
    ours = [(torch.tensor([[40.0, -3.0]]),)]
    assert logit_tolerance("float32", ours) == 1e-4
    assert logit_tolerance("bfloat16", ours) == pytest.approx(2 * 2**-7 * 40)


def test_low_precision_without_a_peer_skips_the_reference(capsys):
    """With no loop and no TransformerLens there is nothing to compare with: the script says
    so and runs no float32 reference (on an 8B shape that would double the run)."""
    assert main([*TINY, "--dtype", "bfloat16", "--skip-baseline",
                 "--transformer-lens", "off"]) == 0
    out = capsys.readouterr().out
    assert "not checked against a float32 reference" in out
    assert "error against the float32 reference" not in out
