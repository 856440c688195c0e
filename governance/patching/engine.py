"""Exact activation patching, many patches per forward.

One generic sweep over `Patch(component, layer, positions, head)`: the clean run's
activations are captured once, then each patch becomes one row of a batched forward of the
corrupted prompt, in which that row's site tensor takes the clean values at the patch's
positions (and head). Only the option-letter logits at the last position are kept.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from governance.models.architectures import Anatomy
from governance.names import COMPONENTS, POSITIONS
from governance.patching.fused import FusedDecoder, unfusable_reason
from governance.patching.sites import (
    Site,
    capture,
    capturing,
    hooked,
    last_logits,
)


@dataclass(frozen=True, order=True)
class Patch:
    """Replace `component` at `layer` (and `head`, for heads) at `positions` with clean values."""

    component: str
    layer: int
    positions: str
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r} is not one of {COMPONENTS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {POSITIONS}")
        if (self.head is None) == (self.component == "head"):
            need = "need a" if self.head is None else "take no"
            raise ValueError(f"{self.component!r} patches {need} head")

    @property
    def site(self) -> Site:
        return Site(self.component, self.layer)


def sweep(
    anatomy: Anatomy, sweeps: Iterable[tuple[str, str]], layers: Sequence[int] | None = None
) -> list[Patch]:
    """Every patch of each (component, positions) sweep, over all layers (and heads)."""
    layers = range(anatomy.n_layers) if layers is None else layers
    for layer in layers:
        if not 0 <= layer < anatomy.n_layers:
            raise ValueError(f"layer {layer} is out of range 0..{anatomy.n_layers - 1}")
    out = []
    for component, positions in sweeps:
        for layer in layers:
            if component == "head":
                out += [Patch(component, layer, positions, h) for h in range(anatomy.n_heads)]
            else:
                out.append(Patch(component, layer, positions))
    return out


def position_mask(positions: str, length: int, identity: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    if positions == "all":
        mask[:] = True
    elif positions == "last":
        mask[-1] = True
    else:
        mask[list(identity)] = True
    return mask


def position_masks(length: int, identity: Sequence[int]) -> dict[str, torch.Tensor]:
    """`position_mask` of each positions kind."""
    return {pos: position_mask(pos, length, identity) for pos in POSITIONS}


@dataclass
class PairRun:
    """Logits of one aligned pair on one question: clean, corrupt, and one row per patch."""

    clean: torch.Tensor  # (vocab,) or (n_options,)
    corrupt: torch.Tensor
    patched: torch.Tensor  # (n_patches, ...)


def _row_edit(rows: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor, inplace: bool = False):
    """Edit for rows `rows` of the batch: where `mask` (rows, pos[, head]) take `clean`.
    In place for the fused path, which owns its tensors; on a copy inside hooks."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        sub = x[rows]
        m = mask.view(*mask.shape, *([1] * (sub.dim() - mask.dim())))
        if not inplace:
            x = x.clone()
        x[rows] = torch.where(m, clean.unsqueeze(0).to(sub.dtype), sub)
        return x

    return edit


@dataclass
class _LayerInputs:
    """What the corrupted run fed each decoder layer: the residual stream and the other
    arguments (rotary embeddings, masks), so a patched run can resume at any layer."""

    hidden: list[torch.Tensor]  # per layer (1, pos, d_model)
    args: list[tuple]
    kwargs: list[dict]


# the residual stream is replayed separately, and the recording run's KV cache must not be
_NOT_REPLAYED = ("hidden_states", "use_cache")


def _record_layer_inputs(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor):
    inputs = _LayerInputs([], [], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.hidden.append(hidden.detach())
        inputs.args.append(tuple(None if isinstance(a, Cache) else a for a in args[1:]))
        inputs.kwargs.append({k: v for k, v in kwargs.items()
                              if k not in _NOT_REPLAYED and not isinstance(v, Cache)})

    handles = [anatomy.layer(i).register_forward_pre_hook(hook, with_kwargs=True)
               for i in range(anatomy.n_layers)]
    try:
        logits = last_logits(model, ids, cache=True)
    finally:
        for h in handles:
            h.remove()
    return inputs, logits


class PatchingEngine:
    """Batched exact patching on one model.

    Each patch is one row of a batched forward of the corrupted prompt. Exact strategies,
    all checked against the reference loop in the tests:

    - `resume` (default): a patch at layer l starts from the corrupted run's residual
      stream entering layer l, so layers 0..l-1 are never recomputed; logits only at the
      last position, only for the option tokens.
    - `prefix` (default): positions before the first one a patch changes are the corrupted
      run's (the prompts agree there, or the patch does not touch them), so a row recomputes
      only the positions from there on, attending to the corrupted run's keys and values
      before them; a last-position patch recomputes one token. The fused path does this for
      every patch; on the model's own layers, for last-position patches (through its KV
      cache).
    - both off: one full forward per row (the plain batched baseline).

    `fused` runs resumed rows, and the clean and corrupted runs, through `FusedDecoder`
    (fused q/k/v and gate/up matmuls, compiled element-wise kernels, in-place residual
    stream) instead of the model's own layers with hooks; None (default) turns it on wherever
    the model is supported (1.6x on an H200, 1.1x on a 2-core CPU). `compiled` (default: on
    CUDA, where it pays for its compile time) compiles its element-wise kernels.
    `chunk_rows` bounds the rows of one forward (memory). None (default): 32 on a CPU; on a
    GPU as many as fit a quarter of its free memory (`rows_for_memory`), since a GPU only
    reaches its matmul rate with large batches.
    """

    def __init__(
        self,
        model: nn.Module,
        anatomy: Anatomy,
        chunk_rows: int | None = None,
        *,
        resume: bool = True,
        prefix: bool = True,
        fused: bool | None = None,
        compiled: bool | None = None,
    ) -> None:
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.model = model
        self.anatomy = anatomy
        self.chunk_rows = chunk_rows
        self._memory_budget: int | None = None
        self.resume = resume
        self.prefix = prefix
        on_cuda = self.device.type == "cuda"
        if fused is None:
            fused = resume and unfusable_reason(model, anatomy) is None
        if fused and not resume:
            raise ValueError("the fused path resumes rows at their layer: it needs resume=True")
        self.fused = (
            FusedDecoder(model, anatomy, compiled=on_cuda if compiled is None else compiled)
            if fused else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(
        self,
        clean_ids: Sequence[int],
        corrupt_ids: Sequence[int],
        identity: Sequence[int],
        patches: Sequence[Patch],
        option_ids: Sequence[int] | None = None,
    ) -> PairRun:
        """Logits (at `option_ids` if given) of the clean, corrupt and every patched run."""
        if len(clean_ids) != len(corrupt_ids):
            raise ValueError(
                f"clean and corrupt prompts differ in length ({len(clean_ids)} vs "
                f"{len(corrupt_ids)}); align them first (governance.inputs.prompts)"
            )
        dev = self.device
        options = None if option_ids is None else to_device(list(option_ids), dev)
        clean = to_device([list(clean_ids)], dev)
        corrupt = to_device([list(corrupt_ids)], dev)
        length = len(clean_ids)
        masks = position_masks(length, identity)
        sites = sorted({p.site for p in patches})
        if self.fused is not None:
            self.fused.refresh()
            acts, inputs, clean_logits, corrupt_logits = self._record_fused(clean, corrupt, sites)
        else:
            acts, clean_logits = capture(self.model, self.anatomy, sites, clean)
            if self.resume:
                inputs, corrupt_logits = _record_layer_inputs(self.model, self.anatomy, corrupt)
            else:
                inputs, corrupt_logits = None, last_logits(self.model, corrupt)

        patched = torch.empty(len(patches), _pick(corrupt_logits[0], options).shape[-1],
                              device=dev)
        chunk_rows = self.rows_per_forward(length)
        if self.fused is not None:
            begin = (patch_begins(masks, clean_ids, corrupt_ids) if self.prefix
                     else dict.fromkeys(POSITIONS, 0))
            begins = [begin[p.positions] for p in patches]
            self._run_fused(patches, begins, acts, inputs, masks, options, chunk_rows, patched)
        else:
            self._run_hooked(patches, acts, inputs, masks, corrupt, options, chunk_rows, patched)
        return PairRun(_pick(clean_logits[0], options), _pick(corrupt_logits[0], options),
                       patched)

    def _record_fused(self, clean: torch.Tensor, corrupt: torch.Tensor, sites: list[Site]):
        """The clean run's site activations and the corrupted run's layer inputs, from one
        two-row forward through the fused layers; the model's own forwards where a sliding
        window shorter than the prompt needs its mask."""
        kwargs = self.fused.layer_kwargs(clean.shape[1])
        if kwargs is None:
            acts, clean_logits = capture(self.model, self.anatomy, sites, clean)
            inputs, corrupt_logits = _record_layer_inputs(self.model, self.anatomy, corrupt)
            return acts, inputs, clean_logits, corrupt_logits
        acts: dict[Site, torch.Tensor] = {}
        record = {site: capturing(acts, site, slice(0, 1)) for site in sites}
        x = self.fused.embed(torch.cat((clean, corrupt)))
        n = self.anatomy.n_layers
        hidden = []
        for i in range(n):
            hidden.append(x[1:].clone())
            self.fused.layer(i, x, kwargs, record)
        logits = self.anatomy.unembed(x[:, -1])
        return acts, _LayerInputs(hidden, [()] * n, [kwargs] * n), logits[:1], logits[1:]

    def _run_fused(self, patches, begins, acts, inputs, masks, options, chunk_rows, patched):
        """Rows through the fused layers, in chunks of one begin position (`patch_begin`),
        each in layer order."""
        final = self.anatomy.n_layers - 1
        order = sorted(range(len(patches)), key=lambda i: (begins[i], patches[i].layer))
        groups: dict[int, list[int]] = defaultdict(list)
        for i in order:
            groups[begins[i]].append(i)
        prefixes: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        for begin, members in groups.items():
            at_begin = {k: m[begin:] for k, m in masks.items()}
            for chunk in _chunks(members, chunk_rows):
                rows = list(enumerate(patches[i] for i in chunk))
                edits = self._edits(rows, acts, at_begin, slice(begin, None), inplace=True)
                # the final layer computes only the last position after its keys and values:
                # its edits past resid_pre see that position alone
                at_end = [(r, p) for r, p in rows
                          if p.layer == final and p.component != "resid_pre"]
                edits.update(self._edits(at_end, acts, {k: m[-1:] for k, m in masks.items()},
                                         slice(-1, None), inplace=True))
                out = self._resume_fused(inputs, [patches[i].layer for i in chunk], begin,
                                         edits, options, prefixes)
                patched.index_copy_(0, to_device(chunk, patched.device), out)

    def _run_hooked(self, patches, acts, inputs, masks, corrupt, options, chunk_rows, patched):
        """Rows through the model's own layers with hooks: resumed at their layer (or full
        forwards), last-position patches over the corrupted run's KV cache."""
        dev = patched.device
        length = corrupt.shape[1]
        last = [i for i, p in enumerate(patches) if self.prefix and p.positions == "last"]
        rest = [i for i, p in enumerate(patches) if not (self.prefix and p.positions == "last")]
        rest.sort(key=lambda i: patches[i].layer)  # `_resume` needs rows in layer order
        for chunk in _chunks(rest, chunk_rows):
            edits = self._edits(list(enumerate(patches[i] for i in chunk)), acts, masks,
                                slice(None))
            if inputs is None:
                ids = corrupt.expand(len(chunk), length)
                with hooked(self.model, self.anatomy, edits):
                    out = _pick(last_logits(self.model, ids), options)
            else:
                out = self._resume(inputs, [patches[i].layer for i in chunk], edits, options)
            patched.index_copy_(0, to_device(chunk, dev), out)
        if last:
            prefix = self.model(input_ids=corrupt[:, :-1], use_cache=True).cache
            one = {"last": torch.ones(1, dtype=torch.bool)}
            for chunk in _chunks(last, chunk_rows):
                edits = self._edits(list(enumerate(patches[i] for i in chunk)), acts, one,
                                    slice(-1, None))
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(chunk))
                ids = corrupt[:, -1:].expand(len(chunk), 1)
                with hooked(self.model, self.anatomy, edits):
                    out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                patched.index_copy_(0, to_device(chunk, dev), _pick(out.logits[:, -1], options))

    def _edits(self, rows: list[tuple[int, Patch]], acts, masks, positions: slice,
               inplace: bool = False):
        """One edit per site, each replacing its rows' masked positions by clean values;
        `rows` pairs each patch with its row in the batch."""
        dev = self.device
        by_site: dict[Site, list[tuple[int, Patch]]] = defaultdict(list)
        for row, patch in rows:
            by_site[patch.site].append((row, patch))
        edits = {}
        for site, members in by_site.items():
            index = to_device([r for r, _ in members], dev)
            mask = torch.stack([masks[p.positions] for _, p in members])  # (rows, pos)
            if site.component == "head":
                heads = torch.zeros(len(members), self.anatomy.n_heads, dtype=torch.bool)
                heads[torch.arange(len(members)), [p.head for _, p in members]] = True
                mask = mask[:, :, None] & heads[:, None, :]
            edits[site] = _row_edit(index, to_device(mask, dev), acts[site][0][positions],
                                    inplace)
        return edits

    def rows_per_forward(self, length: int) -> int:
        """Rows of one batched forward for prompts of `length` tokens: `chunk_rows` if set;
        else 32 on a CPU and, on a GPU, as many as fit a quarter of its free memory."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        if self.device.type != "cuda":
            return 32
        if self._memory_budget is None:
            # asked once: the driver's free-memory query waits for the GPU, and a query per
            # question cost an H200 audit a third of its speed (the host stopped running ahead)
            free, _ = torch.cuda.mem_get_info(self.device)
            # memory PyTorch has cached but not in use is free for these forwards too
            free += (torch.cuda.memory_reserved(self.device)
                     - torch.cuda.memory_allocated(self.device))
            self._memory_budget = free // 4
        element = next(self.model.parameters()).element_size()
        ff = getattr(self.model.config, "intermediate_size", None) or 4 * self.anatomy.d_model
        return rows_for_memory(self.anatomy, ff, length, element, self._memory_budget,
                               hooked=self.fused is None)

    def _resume(self, inputs: _LayerInputs, starts: list[int], edits, options):
        """Run rows from their own layer on through the model's layers with hooks: row r
        joins the batch at layer starts[r] (ascending) with the corrupted residual stream
        entering that layer, so every row costs exactly the layers at and after its patch.
        The rows live in one preallocated residual stream; active rows are always a prefix
        of it (rows come in layer order)."""
        stream = _stream(inputs, starts, 0)
        active = 0
        with hooked(self.model, self.anatomy, edits):
            for i in range(starts[0], self.anatomy.n_layers):
                active = _join(stream, active, inputs.hidden[i], starts.count(i))
                x = stream[:active]
                out = self.anatomy.layer(i)(x, *inputs.args[i], **inputs.kwargs[i])
                x.copy_(out if isinstance(out, torch.Tensor) else out[0])
        return self.anatomy.unembed(stream[:, -1], options).float()

    def _resume_fused(self, inputs: _LayerInputs, starts: list[int], begin: int, edits,
                      options, prefixes: dict):
        """`_resume` through the fused layers, on positions `begin`.. only: each layer
        updates the active rows in place, with the corrupted run's queries, keys and values
        before `begin` in front (computed once per layer and begin, kept in `prefixes`); the final
        layer computes keys and values at every position but the rest only at the last, the
        one position the logits read."""
        fused, final = self.fused, self.anatomy.n_layers - 1
        stream = _stream(inputs, starts, begin)
        active = 0
        for i in range(starts[0], final + 1):
            active = _join(stream, active, inputs.hidden[i][:, begin:], starts.count(i))
            prefix = None
            if begin:
                if (i, begin) not in prefixes:
                    prefixes[i, begin] = fused.prefix_qkv(i, inputs.hidden[i][:, :begin],
                                                         inputs.kwargs[i])
                prefix = prefixes[i, begin]
            fused.layer(i, stream[:active], inputs.kwargs[i], edits, last_only=i == final,
                        prefix=prefix)
        return self.anatomy.unembed(stream[:, -1], options).float()


def _stream(inputs: _LayerInputs, starts: list[int], begin: int) -> torch.Tensor:
    first = inputs.hidden[starts[0]]
    return torch.empty(len(starts), first.shape[1] - begin, first.shape[2], dtype=first.dtype,
                       device=first.device)


def _join(stream: torch.Tensor, active: int, hidden: torch.Tensor, joining: int) -> int:
    """Rows joining at this layer start from the corrupted stream `hidden`; returns the new
    number of active rows."""
    if joining:
        stream[active : active + joining] = hidden
    return active + joining


def _pick(logits: torch.Tensor, options: torch.Tensor | None) -> torch.Tensor:
    """The option tokens' logits (all if None), in fp32."""
    return (logits if options is None else logits[..., options]).float()


def patch_begins(masks: dict[str, torch.Tensor], clean_ids: Sequence[int],
                 corrupt_ids: Sequence[int]) -> dict[str, int]:
    """`patch_begin` of each positions kind, for one aligned pair."""
    first = first_difference(clean_ids, corrupt_ids)
    return {pos: patch_begin(mask, first) for pos, mask in masks.items()}


def first_difference(clean_ids: Sequence[int], corrupt_ids: Sequence[int]) -> int:
    """The first position where two aligned prompts differ (their length if nowhere)."""
    return next((i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids, strict=True))
                 if a != b), len(clean_ids))


def patch_begin(mask: torch.Tensor, first_difference: int) -> int:
    """The first position a patch with this position `mask` can change: the first patched
    position at or after the prompts' first difference (before it, clean and corrupted
    activations are equal, so patching them changes nothing). The last position where the
    patch changes nothing at all: the logits must still be computed there."""
    changed = mask[first_difference:].nonzero()
    last = len(mask) - 1
    return last if len(changed) == 0 else min(first_difference + int(changed[0]), last)


def rows_for_memory(anatomy: Anatomy, d_ff: int, length: int, element_size: int,
                    budget: int, hooked: bool = False, most: int = 1024) -> int:
    """Rows of one forward whose activations fit `budget` bytes: per row and position, the
    residual stream, normed input, q/k/v, attention and MLP outputs and the gate/up
    intermediates, held together at a layer's peak (twice that on the hooked path, whose
    edits copy tensors and whose modules keep more alive); between 1 and `most`."""
    a = anatomy
    width = (4 * a.d_model + (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
             + a.n_heads * a.head_dim + 3 * d_ff)
    per_row = width * length * element_size * (2 if hooked else 1)
    return max(1, min(most, budget // max(per_row, 1)))


def to_device(data, device: torch.device) -> torch.Tensor:
    """A small host tensor (or nested list) on `device` without a device sync: pinned and
    copied asynchronously on CUDA, so the host can queue the next work while the GPU runs."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
