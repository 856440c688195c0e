"""Where activations are read and replaced, and the scoped hooks that do it.

A *site* is (component, layer). Each component maps to one module and one hook kind:

| component   | module                 | hook      | tensor                                   |
|-------------|------------------------|-----------|------------------------------------------|
| `resid_pre` | decoder layer l        | pre-hook  | hidden states entering layer l (B, T, D) |
| `mlp_out`   | layer l's MLP          | post-hook | MLP output (B, T, D)                     |
| `attn_out`  | layer l's attention    | post-hook | attention output after o_proj (B, T, D)  |
| `head`      | layer l's o_proj       | pre-hook  | o_proj input viewed (B, T, head, d_head) |

Hooks are registered inside `hooked()` and always removed, also when a forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from governance.models.architectures import Anatomy
from governance.names import COMPONENTS

# (batch, pos, d) -> (batch, pos, d); heads see (batch, pos, head, d_head)
Edit = Callable[[torch.Tensor], torch.Tensor]


class Site(NamedTuple):
    component: str
    layer: int


def _module(anatomy: Anatomy, site: Site) -> tuple[nn.Module, bool]:
    """The module of a site and whether its tensor is the module's input (pre-hook)."""
    comp, layer = site
    if comp == "resid_pre":
        return anatomy.layer(layer), True
    if comp == "head":
        return anatomy.o_proj(layer), True
    if comp == "mlp_out":
        return anatomy.mlp(layer), False
    if comp == "attn_out":
        return anatomy.attn(layer), False
    raise ValueError(f"unknown component {comp!r}; expected one of {COMPONENTS}")


def _pre_hook(edit: Edit, heads: tuple[int, int] | None):
    def hook(module, args, kwargs):
        if args:
            x = args[0]
            return (_apply(edit, x, heads), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = _apply(edit, kwargs["hidden_states"], heads)
        return args, kwargs

    return hook


def _post_hook(edit: Edit):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return edit(output)
        return (edit(output[0]), *output[1:])

    return hook


def _apply(edit: Edit, x: torch.Tensor, heads: tuple[int, int] | None) -> torch.Tensor:
    if heads is None:
        return edit(x)
    n_heads, d_head = heads
    batch, pos, _ = x.shape
    y = edit(x.view(batch, pos, n_heads, d_head))
    return y.reshape(batch, pos, n_heads * d_head)


@contextmanager
def hooked(model: nn.Module, anatomy: Anatomy, edits: dict[Site, Edit]) -> Iterator[None]:
    """Run forwards with `edits[site]` applied to each site's tensor; hooks removed on exit."""
    handles = []
    try:
        for site, edit in edits.items():
            module, pre = _module(anatomy, site)
            if pre:
                heads = (anatomy.n_heads, anatomy.head_dim) if site.component == "head" else None
                handles.append(
                    module.register_forward_pre_hook(_pre_hook(edit, heads), with_kwargs=True)
                )
            else:
                handles.append(module.register_forward_hook(_post_hook(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capturing(store: dict[Site, torch.Tensor], site: Site, rows: slice = slice(None)) -> Edit:
    """An edit that records the tensor's `rows` (detached) and leaves it unchanged."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        store[site] = x[rows].detach().clone()
        return x

    return edit


def capture(
    model: nn.Module, anatomy: Anatomy, sites: list[Site], input_ids: torch.Tensor,
    positions: Sequence[int] | None = None,
) -> tuple[dict[Site, torch.Tensor], torch.Tensor]:
    """One forward that records every site's tensor; returns (activations, next-token
    logits at each row's last position, or at `positions`)."""
    store: dict[Site, torch.Tensor] = {}
    with hooked(model, anatomy, {s: capturing(store, s) for s in sites}):
        logits = last_logits(model, input_ids, cache=True, positions=positions)
    return store, logits


def last_logits(
    model: nn.Module, input_ids: torch.Tensor, cache: bool = False,
    positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Next-token logits at the last position, or at row b's `positions[b]` (right-padded
    batches), (batch, vocab).

    `cache=True` runs with a throwaway KV cache. Without a cache (and without a mask),
    transformers checks the position ids for packed sequences with a device sync on every
    forward, which stalls a GPU pipeline; use it for small batches, where the cache is
    small."""
    if positions is None:
        out = model(input_ids=input_ids, use_cache=cache, logits_to_keep=1)
        return out.logits[:, -1, :]
    keep = sorted(set(positions))
    out = model(input_ids=input_ids, use_cache=cache,
                logits_to_keep=torch.tensor(keep, device=input_ids.device))
    return out.logits[torch.arange(len(positions)), [keep.index(p) for p in positions]]
