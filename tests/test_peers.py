"""The engine against TransformerLens 3.9, the peer library, on the same weights: its per-head
patching helper and the engine (fused and hooked) must give the same metric for every head."""

import pytest
import torch

from governance.models.architectures import anatomy_of
from governance.models.tiny import tiny_model
from governance.patching.engine import PatchingEngine, sweep
from governance.patching.peers import head_sweep, to_transformer_lens

OPTIONS = [5, 9, 11, 17]


def _prompts(vocab: int, n: int = 2, length: int = 24):
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(20, vocab, (n, length), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 3:5] = torch.randint(20, vocab, (n, 2), generator=gen)
    return clean, corrupt


def _logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, OPTIONS[0]] - logits[:, -1, OPTIONS[1]]).mean()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_head_sweep_matches_transformer_lens(arch):
    model = tiny_model(arch)
    a = anatomy_of(model)
    clean, corrupt = _prompts(model.config.vocab_size)
    tl = to_transformer_lens(model)
    with torch.inference_mode():
        assert torch.allclose(tl(clean)[:, -1], model(clean).logits[:, -1], atol=1e-5)

    theirs = head_sweep(tl, clean, corrupt, _logit_diff)
    assert theirs.shape == (a.n_layers, a.n_heads)
    # the comparison has teeth: heads restore different amounts
    assert float(theirs.max() - theirs.min()) > 1e-3

    patches = sweep(a, [("head", "all")])
    for fused in (None, False):
        engine = PatchingEngine(model, a, fused=fused)
        runs = [engine.run(c.tolist(), k.tolist(), [3, 4], patches, OPTIONS)
                for c, k in zip(clean, corrupt, strict=True)]
        ours = torch.stack([r.patched[:, 0] - r.patched[:, 1] for r in runs]).mean(0)
        torch.testing.assert_close(ours.view(a.n_layers, a.n_heads), theirs.float(),
                                   atol=1e-5, rtol=0)
