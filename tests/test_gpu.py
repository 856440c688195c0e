"""The engine on a CUDA device, with its GPU defaults (fused layers with compiled kernels,
rows sized to free memory, batched AtP): against the slow reference loop in fp32, bf16
against fp32, batched AtP against one prompt at a time. CI has no GPU, so these skip there;
on a GPU machine run `pytest -m gpu`. The same code paths run on the CPU in test_fused.py and
test_attribution.py (kernels compiled for the CPU there)."""

import numpy as np
import pytest
import torch

from governance.models.architectures import anatomy_of
from governance.models.tiny import tiny_model
from governance.patching.attribution import atp_screen
from governance.patching.engine import PatchingEngine, sweep
from governance.patching.reference import reference_patch_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (CI has none; run `pytest -m gpu` on a GPU)"),
]

SWEEPS = [(c, p) for c in ("resid_pre", "mlp_out", "attn_out", "head")
          for p in ("identity", "last", "all")]
OPTIONS = [5, 9, 11, 17]


def _model(arch: str = "llama"):
    model = tiny_model(arch).cuda()
    model.set_attn_implementation("sdpa")
    return model, anatomy_of(model)


def _prompts(vocab: int, lengths=(24, 19, 30)):
    gen = torch.Generator().manual_seed(2)
    out = []
    for n in lengths:
        clean = torch.randint(20, vocab, (n,), generator=gen).tolist()
        corrupt = list(clean)
        for p in (3, 4):
            corrupt[p] = (corrupt[p] + 7 + p) % vocab
        out.append((clean, corrupt, [3, 4]))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_defaults_match_the_reference_loop_in_fp32(arch):
    model, a = _model(arch)
    engine = PatchingEngine(model, a)
    assert engine.fused is not None and engine.fused.compiled
    patches = sweep(a, SWEEPS)
    for clean, corrupt, identity in _prompts(model.config.vocab_size):
        run = engine.run(clean, corrupt, identity, patches)
        _, _, ref = reference_patch_logits(model, a, clean, corrupt, identity, patches)
        torch.testing.assert_close(run.patched, ref.float(), atol=1e-5, rtol=1e-5)


def _assert_bf16_within_tolerance(r32, r16):
    """fp32 logits out; every patched logit within 3% of the fp32 logits' range of its fp32
    value; each patch's effect (distance from the corrupted run) ranked the same."""
    assert r16.patched.dtype == torch.float32
    span = float(r32.patched.max() - r32.patched.min())
    assert float((r16.patched - r32.patched).abs().max()) <= 0.03 * span
    effect32 = (r32.patched - r32.corrupt).norm(dim=-1).cpu().numpy()
    effect16 = (r16.patched - r16.corrupt).norm(dim=-1).cpu().numpy()
    assert np.corrcoef(effect32, effect16)[0, 1] >= 0.999


def test_bf16_matches_fp32_within_stated_tolerance():
    """bf16 weights, fp32 logits out: every patched logit within 3% of the fp32 logits' range
    of its fp32 value, and each patch's effect (distance from the corrupted run) the same
    ranking (correlation >= 0.999). The 1B-shape benchmark states the score difference."""
    model, a = _model()
    engine = PatchingEngine(model, a)
    patches = sweep(a, SWEEPS)
    prompts = _prompts(model.config.vocab_size)
    fp32 = [engine.run(c, k, i, patches) for c, k, i in prompts]
    model.to(torch.bfloat16)
    bf16 = [engine.run(c, k, i, patches) for c, k, i in prompts]
    for r32, r16 in zip(fp32, bf16, strict=True):
        _assert_bf16_within_tolerance(r32, r16)


def test_batched_atp_on_gpu_equals_one_prompt_at_a_time():
    model, a = _model()
    patches = sweep(a, [("head", "all"), ("resid_pre", "identity"), ("mlp_out", "last")])
    prompts = _prompts(model.config.vocab_size)
    batched = atp_screen(model, a, prompts, patches, OPTIONS)  # 16 per batch on a GPU
    single = atp_screen(model, a, prompts, patches, OPTIONS, batch_size=1)
    for x, y in zip(batched, single, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_rows_per_forward_sized_once_from_free_memory():
    """Rows fit a quarter of the free memory measured at the first call; memory taken later
    does not change them (the driver is asked once: the query waits for the GPU)."""
    from governance.patching.engine import rows_for_memory

    model, a = _model()
    engine = PatchingEngine(model, a)
    length = 200_000  # long enough that the tiny model's rows stay under the 1024 cap
    rows = engine.rows_per_forward(length)
    free, _ = torch.cuda.mem_get_info()
    budget = engine._memory_budget
    assert free // 8 <= budget <= free // 2  # a quarter of free (+ PyTorch's cached) memory
    expected = rows_for_memory(a, model.config.intermediate_size, length, 4, budget)
    assert rows == expected and 1 < rows < 1024
    taken = torch.empty(free // 2, dtype=torch.uint8, device="cuda")
    assert engine.rows_per_forward(length) == rows
    del taken


@pytest.mark.parametrize("causal,q_lengths", [(True, (5, 1, 9)), (False, (1, 1, 1))])
def test_flash_varlen_attention_matches_one_sequence_at_a_time(causal, q_lengths):
    """The packed path's flash kernel (bf16): queries of each sequence's last positions over
    all of its keys, grouped-query heads, as per-sequence SDPA computes them."""
    from governance.patching.packed import packed_attention, varlen_available

    assert varlen_available(torch.device("cuda"), torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_lengths = (12, 7, 9)
    q = torch.randn(sum(q_lengths), 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(sum(k_lengths), 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cu_q, cu_k = np.cumsum((0, *q_lengths)), np.cumsum((0, *k_lengths))
    flash = packed_attention(q, k, v, cu_q, cu_k, causal, 0.125, flash=True)
    loop = packed_attention(q, k, v, cu_q, cu_k, causal, 0.125, flash=False)
    torch.testing.assert_close(flash, loop, atol=2e-2, rtol=2e-2)


def test_packed_bf16_matches_fp32_within_stated_tolerance():
    """The GPU's default in bf16 is the packed path with flash attention: its patched logits
    are within the per-pair engine's stated bf16 tolerance of the fp32 reference (3% of the
    logits' range, the same ranking of effects)."""
    from governance.patching.packed import Item

    model, a = _model()
    patches = sweep(a, SWEEPS)
    prompts = _prompts(model.config.vocab_size)
    items = [Item(c, k, i, patches) for c, k, i in prompts]
    fp32 = list(PatchingEngine(model, a, packed=False).run_many(items))
    model.to(torch.bfloat16)
    engine = PatchingEngine(model, a)
    assert engine.packed is not None and engine.packed.flash
    for r32, r16 in zip(fp32, engine.run_many(items), strict=True):
        _assert_bf16_within_tolerance(r32, r16)


def test_packed_fp32_on_gpu_matches_the_reference_loop():
    """fp32 on a GPU: the packed path (forced; attention one sequence at a time) against the
    slow reference loop."""
    from governance.patching.packed import Item

    model, a = _model("qwen3")
    engine = PatchingEngine(model, a, packed=True)
    patches = sweep(a, SWEEPS)
    prompts = _prompts(model.config.vocab_size)
    items = [Item(c, k, i, patches[j::2]) for j, (c, k, i) in enumerate(prompts)]
    for it, run in zip(items, engine.run_many(items), strict=True):
        _, _, ref = reference_patch_logits(model, a, it.clean_ids, it.corrupt_ids, it.identity,
                                           it.patches)
        torch.testing.assert_close(run.patched, ref.float(), atol=1e-5, rtol=1e-5)


def test_audit_on_gpu_batches_persona_prompts_with_the_cpu_s_answers(tokenizer):
    """On a GPU the persona pass runs right-padded batches and the exact stage packed
    batches: the audit's tables match the CPU's one-at-a-time audit of the same model."""
    from governance.audit.run import run_audit
    from governance.audit.spec import AuditSpec
    from governance.models.loading import LoadedModel
    from governance.models.tiny import tiny_questions

    model = tiny_model("llama", vocab_size=len(tokenizer))
    spec = AuditSpec(n_questions=6, pairs=[("a Black person", "a White person")],
                     components=("head:all", "mlp_out:identity"), attention=False,
                     bootstrap=0)
    cpu = run_audit(LoadedModel.from_model(model, tokenizer, "tiny"), spec,
                    questions=tiny_questions(), progress=False)
    gpu = run_audit(LoadedModel.from_model(model.cuda(), tokenizer, "tiny"), spec,
                    questions=tiny_questions(), progress=False, packed=True)
    np.testing.assert_allclose(gpu.scores["score"], cpu.scores["score"], atol=1e-4)
    np.testing.assert_allclose(gpu.behaviour.select_dtypes("number"),
                               cpu.behaviour.select_dtypes("number"), atol=1e-4)
