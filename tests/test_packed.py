"""The packed path (governance.patching.packed): the rows of many prompt pairs in one
forward, against the per-pair engine and the slow reference loop, on every architecture the
fused layers run (tiny random models, fp32, CPU, attention one sequence at a time; the flash
kernel a GPU uses is checked in test_gpu.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from governance.models.architectures import anatomy_of
from governance.models.tiny import tiny_model
from governance.patching.engine import Patch, PatchingEngine, packed_tokens, sweep
from governance.patching.fused import FUSED_ARCHITECTURES
from governance.patching.packed import Item, packed_attention
from governance.patching.reference import reference_patch_logits

ALL_SWEEPS = [(c, p) for c in ("resid_pre", "mlp_out", "attn_out", "head")
              for p in ("identity", "last", "all")]
OPTIONS = [5, 9, 11, 17]


def _model(model_type, tokenizer, **overrides):
    model = tiny_model(model_type, vocab_size=len(tokenizer), **overrides)
    model.set_attn_implementation("sdpa")
    return model, anatomy_of(model)


def _items(aligned, patches):
    """Both aligned prompt pairs (different lengths), each with a different subset of the
    patches, as an audit plan chooses them."""
    return [Item(a.clean_ids, a.corrupt_ids, a.identity, patches[j::2] if j else patches)
            for j, a in enumerate(aligned)]


def _packed_engine(model, anatomy, **kwargs):
    engine = PatchingEngine(model, anatomy, fused=True, compiled=False, packed=True, **kwargs)
    assert engine.packed is not None and not engine.packed.flash  # the CPU's attention loop
    return engine


@pytest.mark.parametrize("model_type", FUSED_ARCHITECTURES)
def test_packed_matches_the_per_pair_engine(model_type, tokenizer, aligned):
    """Every component at every positions, two prompt pairs of different lengths in one
    batch: clean, corrupted and patched logits as the per-pair engine gives them, to 1e-5."""
    model, anatomy = _model(model_type, tokenizer)
    items = _items(aligned, sweep(anatomy, ALL_SWEEPS))
    packed = list(_packed_engine(model, anatomy).run_many(items, OPTIONS))
    single = PatchingEngine(model, anatomy, fused=True, compiled=False, packed=False)
    assert single.packed is None
    for it, run in zip(items, packed, strict=True):
        want = single.run(it.clean_ids, it.corrupt_ids, it.identity, it.patches, OPTIONS)
        assert run.patched.shape == (len(it.patches), len(OPTIONS))
        torch.testing.assert_close(run.clean, want.clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.corrupt, want.corrupt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.patched, want.patched, atol=1e-5, rtol=1e-5)


def test_packed_matches_the_reference_loop_with_biases(tokenizer, aligned):
    """Against the slow obvious loop (one full forward per patch with a hook), on a model
    whose every projection has a bias, over the whole vocabulary."""
    model, anatomy = _model("llama", tokenizer, attention_bias=True, mlp_bias=True)
    patches = sweep(anatomy, [("head", "all"), ("resid_pre", "identity"), ("mlp_out", "last"),
                              ("attn_out", "identity")])
    items = _items(aligned, patches)
    for it, run in zip(items, _packed_engine(model, anatomy).run_many(items), strict=True):
        clean, corrupt, ref = reference_patch_logits(model, anatomy, it.clean_ids,
                                                     it.corrupt_ids, it.identity, it.patches)
        torch.testing.assert_close(run.patched, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.clean, clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.corrupt, corrupt, atol=1e-5, rtol=1e-5)


def test_packed_identities(tokenizer, aligned):
    """Patching layer 0's residual stream at every position gives the clean run; a patch at
    a position where the prompts agree gives the corrupted run; an item with no patches
    still has its clean and corrupted logits."""
    model, anatomy = _model("qwen2", tokenizer)
    a = aligned[1]
    items = [Item(a.clean_ids, a.corrupt_ids, a.identity,
                  [Patch("resid_pre", 0, "all"), Patch("mlp_out", 1, "last")]),
             Item(a.clean_ids, a.corrupt_ids, a.identity, [])]
    first, empty = _packed_engine(model, anatomy).run_many(items, OPTIONS)
    torch.testing.assert_close(first.patched[0], first.clean, atol=1e-5, rtol=1e-5)
    assert empty.patched.shape == (0, len(OPTIONS))
    torch.testing.assert_close(empty.clean, first.clean)
    torch.testing.assert_close(empty.corrupt, first.corrupt)
    assert not torch.allclose(first.clean, first.corrupt)


def test_batches_split_by_tokens_and_keep_the_order(tokenizer, aligned):
    """A token bound smaller than two prompt pairs puts each in its own batch: the results
    are the same as one batch, in the items' order."""
    model, anatomy = _model("llama", tokenizer)
    items = _items(aligned, sweep(anatomy, [("head", "last"), ("mlp_out", "all")])) * 2
    small = packed_tokens(items[0])
    one = _packed_engine(model, anatomy)
    split = _packed_engine(model, anatomy, pack_tokens=small)
    assert [len(b) for b in split._batches(items)] == [1, 1, 1, 1]
    assert [len(b) for b in one._batches(items)] == [4]
    for x, y in zip(one.run_many(items, OPTIONS), split.run_many(items, OPTIONS), strict=True):
        torch.testing.assert_close(x.patched, y.patched, atol=1e-5, rtol=1e-5)


def test_a_batch_counts_the_keys_of_last_position_rows(tokenizer, aligned):
    """A last-position row computes one token but holds its prompt's keys and values: the
    batch bound counts them, so many such rows cannot outgrow memory unseen."""
    a = aligned[1]
    n = len(a.clean_ids)
    last = [Patch("head", 0, "last", h) for h in range(4)]
    item = Item(a.clean_ids, a.corrupt_ids, a.identity, last)
    assert packed_tokens(item) == 2 * n + 4  # one computed token a row
    assert packed_tokens(item, 0.25) == 2 * n + 4 + 0.25 * n * 4


def test_sliding_window_prompts_run_one_at_a_time(tokenizer, aligned):
    """A prompt longer than a sliding window needs the model's own mask: it leaves the
    packed batch and runs through the per-pair engine, with the same answer as the loop."""
    model, anatomy = _model("mistral", tokenizer, sliding_window=8)
    patches = sweep(anatomy, [("head", "all"), ("resid_pre", "identity")])
    items = _items(aligned, patches)
    engine = _packed_engine(model, anatomy)
    assert [isinstance(b, Item) for b in engine._batches(items)] == [True, True]
    for it, run in zip(items, engine.run_many(items), strict=True):
        _, _, ref = reference_patch_logits(model, anatomy, it.clean_ids, it.corrupt_ids,
                                           it.identity, it.patches)
        torch.testing.assert_close(run.patched, ref, atol=1e-5, rtol=1e-5)


def test_packed_attention_is_each_prompt_s_causal_attention():
    """Queries of a prompt's last positions over all of its keys (bottom-right causal), two
    sequences packed, grouped-query heads: each equals the tail of full causal attention."""
    gen = torch.Generator().manual_seed(0)
    heads, kv, d = 4, 2, 8
    lengths, begins = [7, 5], [3, 0]
    full = [(torch.randn(n, heads, d, generator=gen), torch.randn(n, kv, d, generator=gen),
             torch.randn(n, kv, d, generator=gen)) for n in lengths]
    q = torch.cat([f[0][b:] for f, b in zip(full, begins, strict=True)])
    k = torch.cat([f[1] for f in full])
    v = torch.cat([f[2] for f in full])
    cu_q = np.cumsum([0] + [n - b for n, b in zip(lengths, begins, strict=True)])
    cu_k = np.cumsum([0] + lengths)
    out = packed_attention(q, k, v, cu_q, cu_k, True, 0.3, flash=False)
    for s, ((fq, fk, fv), b) in enumerate(zip(full, begins, strict=True)):
        want = F.scaled_dot_product_attention(
            fq.transpose(0, 1)[None], fk.transpose(0, 1)[None], fv.transpose(0, 1)[None],
            is_causal=True, scale=0.3, enable_gqa=True)[0].transpose(0, 1)[b:]
        torch.testing.assert_close(out[cu_q[s]:cu_q[s + 1]], want)


def test_the_planted_head_through_packed_batches(tokenizer):
    """The audit's exact stage on the packed path (several pairs and questions per batch)
    finds the planted head with S = 1, as the per-pair engine does."""
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec
    from governance.models.loading import LoadedModel
    from governance.models.tiny import tiny_questions

    from support.audits import plant_only

    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    loaded = LoadedModel.from_model(model, tokenizer, "tiny-llama")
    plant_only(loaded, (2, 1))
    spec = AuditSpec(n_questions=6, pairs=[("a Black person", "a White person"),
                                           ("a man", "a woman")],
                     components=("head:all", "mlp_out:identity"), attention=False,
                     noise_floor=False, bootstrap=0)
    packed = run_audit(loaded, spec, questions=tiny_questions(), progress=False, packed=True)
    single = run_audit(loaded, spec, questions=tiny_questions(), progress=False, packed=False)
    assert packed.meta["run"]["packed_batches"] and not single.meta["run"]["packed_batches"]
    heads = packed.scores[packed.scores.component == "head"]
    ranked = heads.groupby(["layer", "head"])["score"].mean().sort_values(ascending=False)
    assert ranked.index[0] == (2, 1)
    assert ranked.iloc[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(packed.scores["score"], single.scores["score"], atol=1e-5)


def test_persona_prompts_in_right_padded_batches_match_one_at_a_time(tokenizer):
    """The persona pass on a GPU runs prompts of different lengths in right-padded batches
    (more than one batch here): each prompt's last logits are its own forward's."""
    from governance.audit import run as audit_run
    from governance.models.loading import LoadedModel
    from governance.patching.sites import last_logits

    model = tiny_model("llama", vocab_size=len(tokenizer))
    loaded = LoadedModel.from_model(model, tokenizer, "tiny-llama")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (n,), generator=gen).tolist()
               for n in (9, 23, 14, 31, 9, 17)] * 3
    batched = list(audit_run._batched_logits(loaded, prompts))
    assert len(prompts) > audit_run.PERSONA_BATCH and len(batched) == len(prompts)
    for p, got in zip(prompts, batched, strict=True):
        with torch.inference_mode():
            want = last_logits(model, torch.tensor([p]))[0].float()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
