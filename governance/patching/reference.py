"""The slow, obvious reference: one forward per patch, plain hooks, no batching.

Tests compare the engine against this loop on every component and position; the
benchmark times it as the TransformerLens-style baseline (one full forward per patch, full
logits). It deliberately shares no hook code with the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from governance.models.architectures import Anatomy
from governance.patching.engine import Patch


def _module_and_kind(anatomy: Anatomy, patch: Patch) -> tuple[nn.Module, str]:
    if patch.component == "resid_pre":
        return anatomy.layer(patch.layer), "input"
    if patch.component == "head":
        return anatomy.o_proj(patch.layer), "input"
    if patch.component == "mlp_out":
        return anatomy.mlp(patch.layer), "output"
    return anatomy.attn(patch.layer), "output"


def _first(x):
    return x if isinstance(x, torch.Tensor) else x[0]


def _positions(patch: Patch, length: int, identity: Sequence[int]) -> list[int]:
    if patch.positions == "all":
        return list(range(length))
    if patch.positions == "last":
        return [length - 1]
    return list(identity)


def reference_patch_logits(
    model: nn.Module,
    anatomy: Anatomy,
    clean_ids: Sequence[int],
    corrupt_ids: Sequence[int],
    identity: Sequence[int],
    patches: Sequence[Patch],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full last-position logits: (clean (vocab,), corrupt (vocab,), patched (P, vocab))."""
    device = next(model.parameters()).device
    clean = torch.tensor([list(clean_ids)], device=device)
    corrupt = torch.tensor([list(corrupt_ids)], device=device)
    rows = []
    with torch.no_grad():
        clean_logits = model(input_ids=clean, use_cache=False).logits[0, -1]
        corrupt_logits = model(input_ids=corrupt, use_cache=False).logits[0, -1]
        for patch in patches:
            module, kind = _module_and_kind(anatomy, patch)
            clean_x = _read(model, module, kind, clean)
            where = _positions(patch, len(clean_ids), identity)
            cols = (
                slice(None)
                if patch.head is None
                else slice(patch.head * anatomy.head_dim, (patch.head + 1) * anatomy.head_dim)
            )

            def overwrite(x: torch.Tensor, clean_x=clean_x, where=where, cols=cols) -> torch.Tensor:
                x = x.clone()
                for p in where:
                    x[0, p, cols] = clean_x[0, p, cols]
                return x

            rows.append(_run_overwriting(model, module, kind, corrupt, overwrite)[0, -1])
    patched = torch.stack(rows) if rows else torch.empty(0, clean_logits.shape[-1])
    return clean_logits.float(), corrupt_logits.float(), patched.float()


def _read(model: nn.Module, module: nn.Module, kind: str, ids: torch.Tensor) -> torch.Tensor:
    """The module's input or output tensor on a forward of `ids`."""
    saved = {}

    def save_in(mod, args, kwargs):
        saved["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def save_out(mod, args, output):
        saved["x"] = _first(output).clone()

    if kind == "input":
        handle = module.register_forward_pre_hook(save_in, with_kwargs=True)
    else:
        handle = module.register_forward_hook(save_out)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return saved["x"]


def _run_overwriting(model, module, kind, ids, overwrite) -> torch.Tensor:
    """Full logits of a forward of `ids` with the module's input or output overwritten."""

    def patch_in(mod, args, kwargs):
        if args:
            return (overwrite(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": overwrite(kwargs["hidden_states"])}

    def patch_out(mod, args, output):
        if isinstance(output, torch.Tensor):
            return overwrite(output)
        return (overwrite(output[0]), *output[1:])

    if kind == "input":
        handle = module.register_forward_pre_hook(patch_in, with_kwargs=True)
    else:
        handle = module.register_forward_hook(patch_out)
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
