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
        assert r16.patched.dtype == torch.float32
        span = float(r32.patched.max() - r32.patched.min())
        assert float((r16.patched - r32.patched).abs().max()) <= 0.03 * span
        effect32 = (r32.patched - r32.corrupt).norm(dim=-1).cpu().numpy()
        effect16 = (r16.patched - r16.corrupt).norm(dim=-1).cpu().numpy()
        assert np.corrcoef(effect32, effect16)[0, 1] >= 0.999


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
