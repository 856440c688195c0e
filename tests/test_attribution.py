"""The AtP screen: batched (right-padded) estimates equal one prompt at a time, on every
supported architecture (tiny random models, fp32)."""

import numpy as np
import pytest

from governance.models.architectures import anatomy_of
from governance.models.tiny import TINY_ARCHITECTURES, tiny_model
from governance.patching.attribution import atp_screen
from governance.patching.engine import sweep

SWEEPS = [("head", "all"), ("resid_pre", "identity"), ("mlp_out", "last"), ("attn_out", "all")]


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_batched_screen_equals_one_prompt_at_a_time(model_type, tokenizer, aligned):
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    anatomy = anatomy_of(model)
    patches = sweep(anatomy, SWEEPS)
    options = [tokenizer.convert_tokens_to_ids(t) for t in ("A", "B", "C", "D")]
    prompts = [(a.clean_ids, a.corrupt_ids, a.identity) for a in aligned]
    short = aligned[0]  # a third prompt, cut short, so the batch needs right-padding
    cut = len(short.clean_ids) - 7
    prompts.append((short.clean_ids[:cut], short.corrupt_ids[:cut], short.identity))
    assert len({len(c) for c, _, _ in prompts}) > 1
    nums, dens = atp_screen(model, anatomy, prompts, patches, options, batch_size=3)
    ones, dds = atp_screen(model, anatomy, prompts, patches, options, batch_size=1)
    for i in range(len(prompts)):
        assert np.abs(ones[i]).max() > 1e-6
        np.testing.assert_allclose(nums[i], ones[i], rtol=1e-4, atol=1e-6)
        assert dens[i] == pytest.approx(dds[i], rel=1e-5)
