"""TransformerLens, the peer library, run on our models: a cross-check of the engine's numbers
and the baseline of its benchmark.

`to_transformer_lens` converts a loaded transformers model into a `HookedTransformer` with
the same weights, through TransformerLens's own config and weight converters, unprocessed
(no folded norms, no centring), so its logits are the model's. `head_sweep` runs
TransformerLens's per-head patching helper, `get_act_patch_attn_head_out_all_pos`.
TransformerLens is optional (`pip install transformer-lens`); nothing else imports this.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable

import torch
from torch import nn


def to_transformer_lens(model: nn.Module):
    """A `HookedTransformer` computing what `model` computes, on its device and dtype."""
    from transformer_lens import HookedTransformer, loading

    param = next(model.parameters())
    config = copy.deepcopy(model.config)
    # models built with from_config carry no architectures; TransformerLens dispatches on it
    config.architectures = config.architectures or [type(model).__name__]
    with tempfile.TemporaryDirectory() as folder:  # its config reader takes a local folder
        config.save_pretrained(folder)
        cfg = loading.get_pretrained_model_config(folder, device=param.device, dtype=param.dtype)
        cfg.tokenizer_name = None  # callers pass token ids: no tokenizer to fetch
        state = loading.get_pretrained_state_dict(folder, cfg, model, dtype=param.dtype)
    with warnings.catch_warnings():  # 3.9 points to its 4.x API; 3.9's is the one we compare
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(cfg, move_to_device=False)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.to(param.device).eval()


@torch.inference_mode()
def head_sweep(tl, clean: torch.Tensor, corrupt: torch.Tensor,
               metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`metric` of the corrupted batch with each head's output (z) at every position taken
    from the clean batch, one forward per head: (layers, heads). `clean` and `corrupt` are
    (batch, pos) token ids of one length."""
    from transformer_lens import patching

    _, cache = tl.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_z"))
    return patching.get_act_patch_attn_head_out_all_pos(tl, corrupt, cache, metric)
