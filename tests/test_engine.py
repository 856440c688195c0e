"""The patching engine against exact identities and the slow reference loop, on every
supported architecture (tiny random models, fp32)."""

import numpy as np
import pytest
import torch

from governance.models.architectures import anatomy_of
from governance.models.tiny import TINY_ARCHITECTURES, tiny_model
from governance.patching.engine import Patch, PatchingEngine, sweep
from governance.patching.reference import reference_patch_logits
from governance.patching.scores import restoration
from governance.patching.sites import Site, capture, hooked, last_logits

STRATEGIES = {  # the hooked paths; tests/test_fused.py checks the fused one the same way
    "full": dict(resume=False, prefix=False),
    "resume": dict(resume=True, prefix=False, fused=False),
    "resume+prefix": dict(resume=True, prefix=True, fused=False),
}
ALL_SWEEPS = [(c, p) for c in ("resid_pre", "mlp_out", "attn_out", "head")
              for p in ("identity", "last", "all")]


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def arch(request, tokenizer):
    model = tiny_model(request.param, vocab_size=len(tokenizer))
    return model, anatomy_of(model)


def _scores(engine, aligned, patches):
    runs = [engine.run(a.clean_ids, a.corrupt_ids, a.identity, patches) for a in aligned]
    patched = np.stack([r.patched.numpy() for r in runs], axis=1)
    clean = np.stack([r.clean.numpy() for r in runs])
    corrupt = np.stack([r.corrupt.numpy() for r in runs])
    return restoration(patched, clean, corrupt, n_boot=0).score, runs


def test_personas_move_the_logits(arch, aligned):
    model, anatomy = arch
    _, runs = _scores(PatchingEngine(model, anatomy), aligned, [])
    assert all((r.clean - r.corrupt).abs().max() > 1e-3 for r in runs)


def test_resid_pre_layer0_at_identity_restores_clean_run(arch, aligned):
    model, anatomy = arch
    score, runs = _scores(
        PatchingEngine(model, anatomy), aligned, [Patch("resid_pre", 0, "identity")]
    )
    assert score[0] == pytest.approx(1.0, abs=1e-5)
    for r in runs:
        torch.testing.assert_close(r.patched[0], r.clean, atol=1e-5, rtol=0)


def test_patching_nothing_changes_nothing(arch, aligned):
    """Layer 0's residual at the last position is the same token in both runs: patching it
    must leave the corrupted run exactly as it was (S = 0)."""
    model, anatomy = arch
    score, runs = _scores(PatchingEngine(model, anatomy), aligned, [Patch("resid_pre", 0, "last")])
    assert score[0] == pytest.approx(0.0, abs=1e-5)
    for r in runs:
        torch.testing.assert_close(r.patched[0], r.corrupt, atol=1e-5, rtol=0)


def test_head_split_reproduces_o_proj(arch, aligned):
    model, anatomy = arch
    ids = torch.tensor([list(aligned[0].clean_ids)])
    for layer in range(anatomy.n_layers):
        sites = [Site("head", layer), Site("attn_out", layer)]
        acts, _ = capture(model, anatomy, sites, ids)
        z = acts[Site("head", layer)][0]  # (pos, head, d_head)
        w = anatomy.o_proj_per_head(layer)  # (head, d_head, d_model)
        per_head = torch.einsum("phd,hdm->phm", z, w)
        total = per_head.sum(1)
        bias = anatomy.o_proj_bias(layer)
        if bias is not None:
            total = total + bias
        torch.testing.assert_close(total, acts[Site("attn_out", layer)][0], atol=1e-5, rtol=1e-5)


def test_all_heads_at_once_equals_attn_out(arch, aligned):
    model, anatomy = arch
    a = aligned[0]
    clean = torch.tensor([list(a.clean_ids)])
    corrupt = torch.tensor([list(a.corrupt_ids)])
    engine = PatchingEngine(model, anatomy)
    for layer in range(anatomy.n_layers):
        acts, _ = capture(model, anatomy, [Site("head", layer)], clean)
        z_clean = acts[Site("head", layer)]
        with torch.inference_mode(), hooked(model, anatomy,
                                            {Site("head", layer): lambda x, z=z_clean: z}):
            every_head = last_logits(model, corrupt)[0]
        run = engine.run(a.clean_ids, a.corrupt_ids, a.identity, [Patch("attn_out", layer, "all")])
        torch.testing.assert_close(every_head, run.patched[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_matches_reference_loop(arch, aligned, strategy):
    """Every component at every positions, on both questions, to 1e-5 in fp32, for each
    of the engine's exact strategies."""
    model, anatomy = arch
    patches = sweep(anatomy, ALL_SWEEPS)
    engine = PatchingEngine(model, anatomy, chunk_rows=11, **STRATEGIES[strategy])
    score, runs = _scores(engine, aligned, patches)
    ref = [reference_patch_logits(model, anatomy, a.clean_ids, a.corrupt_ids, a.identity, patches)
           for a in aligned]
    for run, (clean, corrupt, patched) in zip(runs, ref, strict=True):
        torch.testing.assert_close(run.patched, patched, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.clean, clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.corrupt, corrupt, atol=1e-5, rtol=1e-5)
    ref_score = restoration(
        np.stack([p.numpy() for _, _, p in ref], axis=1),
        np.stack([c.numpy() for c, _, _ in ref]),
        np.stack([k.numpy() for _, k, _ in ref]),
        n_boot=0,
    ).score
    np.testing.assert_allclose(score, ref_score, atol=1e-5)


def test_chunking_does_not_change_results(tokenizer, aligned):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    anatomy = anatomy_of(model)
    patches = sweep(anatomy, [("head", "all"), ("mlp_out", "identity"), ("head", "last")])
    a = aligned[1]
    one = PatchingEngine(model, anatomy, chunk_rows=1).run(
        a.clean_ids, a.corrupt_ids, a.identity, patches, [5, 6, 7, 8])
    many = PatchingEngine(model, anatomy, chunk_rows=64).run(
        a.clean_ids, a.corrupt_ids, a.identity, patches, [5, 6, 7, 8])
    assert one.patched.shape == (len(patches), 4)
    torch.testing.assert_close(one.patched, many.patched, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_when_a_forward_raises(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    anatomy = anatomy_of(model)

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooked(model, anatomy, {
        Site("mlp_out", 1): boom, Site("resid_pre", 0): lambda x: x,
    }):
        last_logits(model, torch.tensor([[1, 2, 3]]))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_patch_validation():
    with pytest.raises(ValueError, match="component"):
        Patch("resid_post", 0, "all")
    with pytest.raises(ValueError, match="positions"):
        Patch("mlp_out", 0, "first")
    with pytest.raises(ValueError, match="need a head"):
        Patch("head", 0, "all")
    with pytest.raises(ValueError, match="take no head"):
        Patch("mlp_out", 0, "all", head=1)


def test_patch_begin_is_the_first_position_a_patch_can_change():
    from governance.patching.engine import first_difference, patch_begin, position_mask

    assert first_difference([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_difference([1, 2], [1, 2]) == 2
    identity = [3, 4, 5]
    assert patch_begin(position_mask("all", 10, identity), 4) == 4
    assert patch_begin(position_mask("identity", 10, identity), 2) == 3
    assert patch_begin(position_mask("identity", 10, identity), 4) == 4
    assert patch_begin(position_mask("last", 10, identity), 4) == 9
    # nothing to change (identical prompts, or every patched position before the difference):
    # only the last position is computed, where the logits are read
    assert patch_begin(position_mask("all", 10, identity), 10) == 9
    assert patch_begin(position_mask("identity", 10, identity), 7) == 9


def test_unaligned_prompts_are_refused(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    engine = PatchingEngine(model, anatomy_of(model))
    with pytest.raises(ValueError, match="differ in length"):
        engine.run([1, 2, 3], [1, 2], [1], [Patch("mlp_out", 0, "all")])


def test_rows_per_forward_fit_the_memory_budget(tokenizer):
    """The automatic chunk size: the rows whose activations fit the budget, never 0, capped;
    the hooked path counts double. On a CPU the engine keeps 32."""
    from governance.patching.engine import rows_for_memory

    model = tiny_model("llama", vocab_size=len(tokenizer))
    a = anatomy_of(model)  # d_model 32, 4 heads x 8, 2 KV heads, d_ff 64
    per_row = (4 * 32 + (4 + 2 * 2) * 8 + 4 * 8 + 3 * 64) * 100 * 4  # 100 positions, fp32
    assert rows_for_memory(a, 64, 100, 4, 10 * per_row) == 10
    assert rows_for_memory(a, 64, 100, 4, 10 * per_row + per_row - 1) == 10
    assert rows_for_memory(a, 64, 100, 4, 10 * per_row, hooked=True) == 5
    assert rows_for_memory(a, 64, 100, 4, per_row // 2) == 1
    assert rows_for_memory(a, 64, 100, 4, 10**15) == 1024
    assert PatchingEngine(model, a).rows_per_forward(100) == 32
    assert PatchingEngine(model, a, chunk_rows=7).rows_per_forward(100) == 7
