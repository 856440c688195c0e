"""The benchmark script runs end to end on a tiny shape and its agreement checks hold (the
timings themselves are not tested: speed is proven by running the script, not by tests)."""

import pytest
import torch

from benchmarks.patching import engine_flops, layer_flops, load, logit_tolerance, main
from governance.patching.engine import sweep


def test_benchmark_runs_and_agrees_on_a_tiny_shape(capsys):
    argv = ["--shape", "tiny", "--pairs", "2", "--tokens", "24", "--sweeps", "head:all",
            "mlp_out:last", "resid_pre:identity", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "FAIL" not in out
    assert "engine on the model's own layers with hooks" in out


def test_flops_count_what_each_row_recomputes():
    """Fused: a last-position patch at the final layer costs keys/values of one position
    plus one query; an all-positions patch recomputes from the prompts' first difference."""
    import argparse

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
