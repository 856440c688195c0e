"""The fused fast path (governance.patching.fused) against the model's own layers and the
slow reference loop, on every architecture it runs (tiny random models, fp32, CPU)."""

import pytest
import torch

from governance.models.architectures import anatomy_of
from governance.models.tiny import TINY_ARCHITECTURES, tiny_model
from governance.patching.engine import Patch, PatchingEngine, sweep
from governance.patching.fused import FUSED_ARCHITECTURES, FusedDecoder, unfusable_reason
from governance.patching.reference import reference_patch_logits

ALL_SWEEPS = [(c, p) for c in ("resid_pre", "mlp_out", "attn_out", "head")
              for p in ("identity", "last", "all")]


def _model(model_type, tokenizer, attn="eager", **overrides):
    model = tiny_model(model_type, vocab_size=len(tokenizer), **overrides)
    model.set_attn_implementation(attn)
    return model, anatomy_of(model)


def _assert_matches_reference(model, anatomy, aligned, patches, engine):
    for a in aligned:
        run = engine.run(a.clean_ids, a.corrupt_ids, a.identity, patches)
        _, _, ref = reference_patch_logits(model, anatomy, a.clean_ids, a.corrupt_ids,
                                           a.identity, patches)
        torch.testing.assert_close(run.patched, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", FUSED_ARCHITECTURES)
def test_fused_engine_matches_reference_loop(model_type, attn, tokenizer, aligned):
    """Every component at every positions through the fused layers, to 1e-5 in fp32; with
    eager attention (a materialised mask) and SDPA (no mask: is_causal)."""
    model, anatomy = _model(model_type, tokenizer, attn)
    engine = PatchingEngine(model, anatomy, chunk_rows=11, fused=True, compiled=False)
    assert engine.fused is not None
    _assert_matches_reference(model, anatomy, aligned, sweep(anatomy, ALL_SWEEPS), engine)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),  # every projection has a bias
    ("mistral", dict(sliding_window=8)),  # a sliding-window mask shorter than the prompt
])
def test_fused_engine_with_biases_and_sliding_windows(model_type, overrides, tokenizer, aligned):
    model, anatomy = _model(model_type, tokenizer, "sdpa", **overrides)
    engine = PatchingEngine(model, anatomy, chunk_rows=16, fused=True, compiled=False)
    patches = sweep(anatomy, [("head", "all"), ("resid_pre", "identity"), ("mlp_out", "all")])
    _assert_matches_reference(model, anatomy, aligned, patches, engine)


def test_fused_layer_equals_the_model_layer(tokenizer, aligned):
    """With no edits, one fused layer is the transformers layer (and updates in place)."""
    model, anatomy = _model("qwen3", tokenizer, "sdpa")
    ids = torch.tensor([list(aligned[0].clean_ids)])
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"], kwargs, output))

    handle = anatomy.layer(1).register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        handle.remove()
    hidden, kwargs, output = seen[0]
    fused = FusedDecoder(model, anatomy)
    fused.refresh()
    with torch.inference_mode():
        x = hidden.clone()
        fused.layer(1, x, kwargs, {})
    expected = output if isinstance(output, torch.Tensor) else output[0]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_fused_weights_follow_the_model(tokenizer, aligned):
    """Weights changed in place after the engine was built are picked up (no stale copy)."""
    model, anatomy = _model("llama", tokenizer, "sdpa")
    engine = PatchingEngine(model, anatomy, fused=True, compiled=False)
    patches = [Patch("head", 1, "all", 2), Patch("mlp_out", 0, "identity")]
    a = aligned[1]
    before = engine.run(a.clean_ids, a.corrupt_ids, a.identity, patches).patched
    with torch.no_grad():
        anatomy.mlp(1).up_proj.weight.mul_(3.0)
        anatomy.attn(2).q_proj.weight.mul_(-1.0)
    after = engine.run(a.clean_ids, a.corrupt_ids, a.identity, patches).patched
    assert (after - before).abs().max() > 1e-3
    _assert_matches_reference(model, anatomy, [a], patches, engine)


def test_compiled_kernels_match_the_eager_ones(tokenizer, aligned):
    """torch.compile'd kernels (inductor's CPU backend here; the GPU run uses the same
    graphs) give the eager path's numbers."""
    model, anatomy = _model("qwen3", tokenizer, "sdpa")
    patches = sweep(anatomy, [("head", "all"), ("resid_pre", "identity")])
    a = aligned[0]
    eager = PatchingEngine(model, anatomy, fused=True, compiled=False)
    compiled = PatchingEngine(model, anatomy, fused=True, compiled=True)
    want = eager.run(a.clean_ids, a.corrupt_ids, a.identity, patches).patched
    got = compiled.run(a.clean_ids, a.corrupt_ids, a.identity, patches).patched
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(set(TINY_ARCHITECTURES) - set(FUSED_ARCHITECTURES)))
def test_other_architectures_are_refused_with_the_reason(model_type, tokenizer):
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    anatomy = anatomy_of(model)
    reason = unfusable_reason(model, anatomy)
    assert reason is not None and model_type in reason
    assert PatchingEngine(model, anatomy, fused=None).fused is None  # auto: the hooked path
    with pytest.raises(ValueError, match="fused path cannot run"):
        PatchingEngine(model, anatomy, fused=True)


def test_fused_is_the_default_where_supported_and_needs_resume(tokenizer):
    model, anatomy = _model("llama", tokenizer)
    engine = PatchingEngine(model, anatomy)
    assert engine.fused is not None and not engine.fused.compiled  # compiled on CUDA only
    assert PatchingEngine(model, anatomy, resume=False).fused is None
    with pytest.raises(ValueError, match="resume=True"):
        PatchingEngine(model, anatomy, resume=False, fused=True)


def test_fused_engine_without_prefix_reuse_matches_reference_loop(tokenizer, aligned):
    """prefix=False: every row recomputes every position (the prefix path's own check is
    the default in the tests above)."""
    model, anatomy = _model("qwen3", tokenizer, "sdpa")
    engine = PatchingEngine(model, anatomy, chunk_rows=16, prefix=False, fused=True,
                            compiled=False)
    patches = sweep(anatomy, [("head", "all"), ("mlp_out", "last"), ("resid_pre", "identity")])
    _assert_matches_reference(model, anatomy, aligned[:2], patches, engine)


def _forwards_of(model):
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


def test_fused_engine_never_runs_the_model_forward(tokenizer, aligned):
    """The clean and corrupted runs go through the fused layers too: the model's own
    forward (slow on the host, which then cannot keep a GPU fed) is not called, unless a
    sliding window shorter than the prompt needs its mask."""
    a = aligned[0]
    for overrides, expect_forward in ((dict(), False), (dict(sliding_window=8), True),
                                      (dict(sliding_window=4096), False)):
        model, anatomy = _model("mistral", tokenizer, "sdpa", **overrides)
        patches = sweep(anatomy, ALL_SWEEPS)
        engine = PatchingEngine(model, anatomy, fused=True, compiled=False)
        calls, handle = _forwards_of(model)
        try:
            engine.run(a.clean_ids, a.corrupt_ids, a.identity, patches)
        finally:
            handle.remove()
        assert bool(calls) == expect_forward, overrides
        kwargs = engine.fused.layer_kwargs(len(a.clean_ids))
        assert (kwargs is None) == expect_forward


def test_fused_prefix_is_what_the_layer_computes_there(tokenizer, aligned):
    """prefix_qkv gives the queries, keys and values the layer computes at those positions
    (checked through a row that resumes after the prefix: it equals the full row)."""
    model, anatomy = _model("qwen3", tokenizer, "sdpa")
    fused = FusedDecoder(model, anatomy)
    fused.refresh()
    ids = torch.tensor([list(aligned[0].clean_ids)])
    length, begin = ids.shape[1], 7
    kwargs = fused.layer_kwargs(length)
    with torch.inference_mode():
        full = fused.embed(ids)
        part = full[:, begin:].clone()
        for i in range(anatomy.n_layers):
            prefix = fused.prefix_qkv(i, full[:, :begin], kwargs)
            fused.layer(i, full, kwargs, {})
            fused.layer(i, part, kwargs, {}, prefix=prefix)
            torch.testing.assert_close(part, full[:, begin:], atol=1e-5, rtol=1e-5)
