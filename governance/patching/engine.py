"""Exact activation patching, many patches per forward.

One generic sweep over `Patch(component, layer, positions, head)`: the clean run's
activations are captured once, then each patch becomes one row of a batched forward of the
corrupted prompt, in which that row's site tensor takes the clean values at the patch's
positions (and head). Only the option-letter logits at the last position are kept.

Shapes in comments: `pos` is the prompt's length, `rows` the rows of one batched forward,
`n_logits` the logits kept per row (the option tokens', or the whole vocabulary's).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from transformers import Cache

from governance.models.architectures import Anatomy
from governance.names import COMPONENTS, POSITIONS
from governance.patching.fused import FusedDecoder, unfusable_reason
from governance.patching.packed import Item, PackedRunner, varlen_available
from governance.patching.sites import (
    Edit,
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
        """The (component, layer) whose tensor this patch edits (all heads share one site)."""
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
    """The positions a patch of kind `positions` replaces, (length,) bool on the host:
    every one, the last, or the persona's `identity` positions."""
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


def _row_edit(rows: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor,
              inplace: bool = False) -> Edit:
    """An edit of the batch's rows `rows` (n,): where `mask` (n, pos) is set, the rows take
    `clean` (pos, d_model); for heads, mask (n, pos, head) and clean (pos, head, d_head).
    The edit takes and returns the site tensor (batch, pos, d_model) or
    (batch, pos, head, d_head). In place for the fused path, which owns its tensors; on a
    copy inside hooks, whose tensors the model may still use."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        sub = x[rows]  # (n, pos, d_model) or (n, pos, head, d_head)
        m = mask.view(*mask.shape, *([1] * (sub.dim() - mask.dim())))  # broadcast over features
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
    args: list[tuple[Any, ...]]  # per layer: positional arguments after the hidden states
    kwargs: list[dict[str, Any]]  # per layer: keyword arguments, no KV cache


# the residual stream is replayed separately, and the recording run's KV cache must not be
_NOT_REPLAYED = ("hidden_states", "use_cache")


def _record_layer_inputs(model: nn.Module, anatomy: Anatomy,
                         ids: torch.Tensor) -> tuple[_LayerInputs, torch.Tensor]:
    """One forward of `ids` (1, pos) through the model's own layers, recording each layer's
    inputs (`_LayerInputs`) for resumed rows; returns them and the last position's logits
    (1, vocab)."""
    inputs = _LayerInputs([], [], [])

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (1, pos, d_model)
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


@dataclass(frozen=True)
class _Question:
    """One question's state in `PatchingEngine.run`: built once from the clean and corrupted
    runs, then read by every chunk of patched rows."""

    patches: Sequence[Patch]
    # the clean run's tensor per site: (1, pos, d_model); heads (1, pos, head, d_head)
    acts: dict[Site, torch.Tensor]
    # the corrupted run's layer inputs; None without resume (rows are full forwards)
    inputs: _LayerInputs | None
    masks: dict[str, torch.Tensor]  # per positions kind: (pos,) bool, on the host
    # per patch: the first position its row computes on the fused path (`patch_begin`);
    # None on the hooked path
    begins: list[int] | None
    corrupt: torch.Tensor  # (1, pos) token ids
    options: torch.Tensor | None  # (n_options,) token ids; None keeps the whole vocabulary
    n_logits: int  # logits kept per row: n_options, or the vocabulary's size

    @property
    def length(self) -> int:
        """The prompts' length in tokens."""
        return self.corrupt.shape[1]

    def empty_patched(self) -> torch.Tensor:
        """The tensor the rows' logits are copied into, (n_patches, n_logits) fp32, unset."""
        return torch.empty(len(self.patches), self.n_logits, device=self.corrupt.device)


class _Recording(NamedTuple):
    """What the clean and corrupted runs leave for the patched rows."""

    acts: dict[Site, torch.Tensor]  # clean run per site, as in `_Question.acts`
    inputs: _LayerInputs | None  # corrupted run's layer inputs; None without resume
    clean_logits: torch.Tensor  # (1, vocab) at the last position
    corrupt_logits: torch.Tensor  # (1, vocab) at the last position


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

    `packed` makes `run_many` run the rows of many prompt pairs in one forward
    (`governance.patching.packed`); None (default) turns it on where variable-length flash
    attention runs (CUDA, half precision) and the fused layers do. `pack_tokens` bounds a
    packed batch's row tokens (default: a quarter of the GPU's free memory; 4096 on a CPU).
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
        packed: bool | None = None,
        pack_tokens: int | None = None,
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
        dtype = next(model.parameters()).dtype
        flash = varlen_available(self.device, dtype)
        if packed is None:
            packed = self.fused is not None and flash
        if packed and self.fused is None:
            raise ValueError("the packed path runs the fused layers: it needs fused=True")
        self.packed = PackedRunner(self.fused, anatomy, flash=flash) if packed else None
        if pack_tokens is not None and pack_tokens < 1:
            raise ValueError(f"pack_tokens must be at least 1, got {pack_tokens}")
        self.pack_tokens = pack_tokens

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are, and so the engine's tensors."""
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
        clean = to_device([list(clean_ids)], dev)  # (1, pos)
        corrupt = to_device([list(corrupt_ids)], dev)  # (1, pos)
        masks = position_masks(len(clean_ids), identity)
        acts, inputs, clean_logits, corrupt_logits = self._record(
            clean, corrupt, sorted({p.site for p in patches}))
        begins = None
        if self.fused is not None:
            begin = (patch_begins(masks, clean_ids, corrupt_ids) if self.prefix
                     else dict.fromkeys(POSITIONS, 0))
            begins = [begin[p.positions] for p in patches]
        corrupt_kept = _pick(corrupt_logits[0], options)  # (n_logits,)
        question = _Question(patches=patches, acts=acts, inputs=inputs, masks=masks,
                             begins=begins, corrupt=corrupt, options=options,
                             n_logits=corrupt_kept.shape[-1])
        if self.fused is not None:
            patched = self._run_fused(question)
        else:
            patched = self._run_hooked(question)
        return PairRun(_pick(clean_logits[0], options), corrupt_kept, patched)

    def run_many(self, items: Sequence[Item],
                 option_ids: Sequence[int] | None = None) -> Iterator[PairRun]:
        """`run` of every item, in order, one ahead (`one_ahead`): item (with `packed`,
        packed batch, bounded by `pack_tokens`) k+1 is queued before k's results are handed
        out, so reading them back (a device sync on a GPU) never leaves it idle."""
        if self.packed is None:
            yield from one_ahead(self.run(it.clean_ids, it.corrupt_ids, it.identity,
                                          it.patches, option_ids) for it in items)
            return
        options = None if option_ids is None else to_device(list(option_ids), self.device)

        def batches() -> Iterator[list[PairRun]]:
            for batch in self._batches(items):
                if not isinstance(batch, list):  # an item the packed path cannot run
                    yield [self.run(batch.clean_ids, batch.corrupt_ids, batch.identity,
                                    batch.patches, option_ids)]
                    continue
                clean, corrupt, patched = self.packed.run(batch, options)
                yield [PairRun(clean[j], corrupt[j], patched[j]) for j in range(len(batch))]

        for runs in one_ahead(batches()):
            yield from runs

    def _batches(self, items: Sequence[Item]) -> Iterator[list[Item] | Item]:
        """Consecutive items in packed batches of at most `pack_tokens` tokens (recording
        and rows); an item alone where its prompt needs the model's own sliding-window
        mask."""
        assert self.fused is not None
        self.fused.refresh()
        budget = self.tokens_per_batch()
        a = self.anatomy
        ff = getattr(self.model.config, "intermediate_size", None) or 4 * a.d_model
        # a row's keys and values (its prefix's and its own) cost 2 kv widths a token, where
        # a computed token costs `rows_for_memory`'s width: last-position rows are one token
        # with a prompt's worth of keys
        key_share = 2 * a.n_kv_heads * a.head_dim / token_width(a, ff)
        batch: list[Item] = []
        tokens = 0.0
        for it in items:
            if self.fused.layer_kwargs(len(it.clean_ids)) is None:
                if batch:
                    yield batch
                batch, tokens = [], 0.0
                yield it
                continue
            n = packed_tokens(it, key_share)
            if batch and tokens + n > budget:
                yield batch
                batch, tokens = [], 0.0
            batch.append(it)
            tokens += n
        if batch:
            yield batch

    def tokens_per_batch(self) -> int:
        """Tokens of one packed batch: `pack_tokens` if set; else 4096 on a CPU and, on a
        GPU, as many as fit a quarter of its free memory."""
        if self.pack_tokens is not None:
            return self.pack_tokens
        if self.device.type != "cuda":
            return 4096
        return self._rows_in_memory(1, most=1 << 18)

    @torch.inference_mode()
    def run_edits(
        self,
        ids: Sequence[int],
        batches: Sequence[tuple[Sequence[int], dict[Site, Edit]]],
        option_ids: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rows of prompt `ids` under edits other than clean-value patches (ablations,
        `governance.mitigation`), on the hooked path with resume: the prompt runs once
        unedited, recording each layer's input; then each batch `(starts, edits)` runs one
        row per start (ascending), row r resumed at layer starts[r] with `edits` applied.
        Returns the unedited logits (n_logits,) and per batch (rows, n_logits), fp32."""
        dev = self.device
        options = None if option_ids is None else to_device(list(option_ids), dev)
        inputs, logits = _record_layer_inputs(self.model, self.anatomy,
                                              to_device([list(ids)], dev))  # (1, vocab)
        rows = []
        for starts, edits in batches:
            if list(starts) != sorted(starts):
                raise ValueError(f"rows must come in layer order, got starts {list(starts)}")
            rows.append(self._resume(inputs, list(starts), edits, options))
        return _pick(logits[0], options), rows

    def _record(self, clean: torch.Tensor, corrupt: torch.Tensor,
                sites: list[Site]) -> _Recording:
        """The clean run of `clean` (1, pos), recording `sites`, and the corrupted run of
        `corrupt` (1, pos), recording the layer inputs resumed rows start from: through the
        fused layers where they run the prompt, else through the model's own forwards (the
        hooked path, or a sliding window shorter than the prompt, which needs its mask)."""
        if self.fused is not None:
            self.fused.refresh()
            kwargs = self.fused.layer_kwargs(clean.shape[1])
            if kwargs is not None:
                return self._record_fused(clean, corrupt, sites, kwargs)
        acts, clean_logits = capture(self.model, self.anatomy, sites, clean)
        if self.resume:
            inputs, corrupt_logits = _record_layer_inputs(self.model, self.anatomy, corrupt)
            return _Recording(acts, inputs, clean_logits, corrupt_logits)
        return _Recording(acts, None, clean_logits, last_logits(self.model, corrupt))

    def _record_fused(self, clean: torch.Tensor, corrupt: torch.Tensor, sites: list[Site],
                      layer_kwargs: dict[str, Any]) -> _Recording:
        """`_record` from one two-row forward through the fused layers, which every layer
        gets `layer_kwargs` (`FusedDecoder.layer_kwargs`)."""
        assert self.fused is not None
        acts: dict[Site, torch.Tensor] = {}
        record = {site: capturing(acts, site, slice(0, 1)) for site in sites}  # the clean row
        x = self.fused.embed(torch.cat((clean, corrupt)))  # (2, pos, d_model): clean, corrupt
        n = self.anatomy.n_layers
        hidden = []
        for i in range(n):
            hidden.append(x[1:].clone())  # (1, pos, d_model)
            self.fused.layer(i, x, layer_kwargs, record)
        logits = self.anatomy.unembed(x[:, -1])  # (2, vocab)
        inputs = _LayerInputs(hidden, [()] * n, [layer_kwargs] * n)
        return _Recording(acts, inputs, logits[:1], logits[1:])

    def _run_fused(self, q: _Question) -> torch.Tensor:
        """Every patch's row through the fused layers; returns their logits
        (n_patches, n_logits). Rows of one begin position (`patch_begin`) run together in
        chunks, each in layer order, on the positions from that begin on."""
        assert q.begins is not None, "the fused path needs each patch's begin"
        begins, patches = q.begins, q.patches
        out = q.empty_patched()  # (n_patches, n_logits)
        chunk_rows = self.rows_per_forward(q.length)
        order = sorted(range(len(patches)), key=lambda i: (begins[i], patches[i].layer))
        groups: dict[int, list[int]] = defaultdict(list)
        for i in order:
            groups[begins[i]].append(i)
        # the corrupted run's queries, keys and values before a begin, per (layer, begin)
        prefixes: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        for begin, members in groups.items():
            for chunk in _chunks(members, chunk_rows):
                logits = self._fused_rows(q, chunk, begin, prefixes)  # (rows, n_logits)
                out.index_copy_(0, to_device(chunk, out.device), logits)
        return out

    def _fused_rows(self, q: _Question, chunk: list[int], begin: int,
                    prefixes: dict[tuple[int, int], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Logits (rows, n_logits) of the patches `chunk` (one begin, in layer order), each
        row resumed at its patch's layer on positions `begin`.. ."""
        assert q.inputs is not None, "the fused path resumes rows at their layer"
        rows = list(enumerate(q.patches[i] for i in chunk))
        at_begin = {k: m[begin:] for k, m in q.masks.items()}  # (pos - begin,) each
        edits = self._edits(rows, q.acts, at_begin, slice(begin, None), inplace=True)
        # the final layer computes only the last position after its keys and values:
        # its edits past resid_pre see that position alone
        final = self.anatomy.n_layers - 1
        at_end = [(r, p) for r, p in rows if p.layer == final and p.component != "resid_pre"]
        edits.update(self._edits(at_end, q.acts, {k: m[-1:] for k, m in q.masks.items()},
                                 slice(-1, None), inplace=True))
        starts = [q.patches[i].layer for i in chunk]
        return self._resume_fused(q.inputs, starts, begin, edits, q.options, prefixes)

    def _run_hooked(self, q: _Question) -> torch.Tensor:
        """Every patch's row through the model's own layers with hooks; returns their logits
        (n_patches, n_logits). Rows resume at their layer (or run full forwards, without
        resume); with prefix, last-position patches run the last token alone over the
        corrupted run's KV cache."""
        out = q.empty_patched()  # (n_patches, n_logits)
        chunk_rows = self.rows_per_forward(q.length)
        at_last = [i for i, p in enumerate(q.patches) if self.prefix and p.positions == "last"]
        rest = [i for i, p in enumerate(q.patches)
                if not (self.prefix and p.positions == "last")]
        rest.sort(key=lambda i: q.patches[i].layer)  # `_resume` needs rows in layer order
        for chunk in _chunks(rest, chunk_rows):
            logits = self._hooked_rows(q, chunk)  # (rows, n_logits)
            out.index_copy_(0, to_device(chunk, out.device), logits)
        if at_last:
            before_last = self.model(input_ids=q.corrupt[:, :-1], use_cache=True).cache
            for chunk in _chunks(at_last, chunk_rows):
                logits = self._hooked_last(q, chunk, before_last)  # (rows, n_logits)
                out.index_copy_(0, to_device(chunk, out.device), logits)
        return out

    def _hooked_rows(self, q: _Question, chunk: list[int]) -> torch.Tensor:
        """Logits (rows, n_logits) of the patches `chunk` (in layer order) on the model's own
        layers: each row resumed at its patch's layer, or a full forward without resume."""
        rows = list(enumerate(q.patches[i] for i in chunk))
        edits = self._edits(rows, q.acts, q.masks, slice(None))
        if q.inputs is None:
            ids = q.corrupt.expand(len(chunk), q.length)  # (rows, pos)
            with hooked(self.model, self.anatomy, edits):
                return _pick(last_logits(self.model, ids), q.options)
        return self._resume(q.inputs, [q.patches[i].layer for i in chunk], edits, q.options)

    def _hooked_last(self, q: _Question, chunk: list[int], before_last: Cache) -> torch.Tensor:
        """Logits (rows, n_logits) of the last-position patches `chunk`: the last token
        alone, on a copy of `before_last`, the corrupted run's KV cache of the positions
        before it."""
        one = {"last": torch.ones(1, dtype=torch.bool)}  # (1,): the one position computed
        edits = self._edits(list(enumerate(q.patches[i] for i in chunk)), q.acts, one,
                            slice(-1, None))
        cache = copy.deepcopy(before_last)
        cache.batch_repeat_interleave(len(chunk))
        ids = q.corrupt[:, -1:].expand(len(chunk), 1)  # (rows, 1)
        with hooked(self.model, self.anatomy, edits):
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return _pick(out.logits[:, -1], q.options)

    def _edits(self, rows: list[tuple[int, Patch]], acts: dict[Site, torch.Tensor],
               masks: dict[str, torch.Tensor], positions: slice,
               inplace: bool = False) -> dict[Site, Edit]:
        """One edit per site, each replacing its rows' masked positions by clean values;
        `rows` pairs each patch with its row in the batch, `masks` (pos',) bool per
        positions kind covers the positions the batch computes, `positions` selects them
        from the clean activations `acts` (1, pos, ...)."""
        dev = self.device
        by_site: dict[Site, list[tuple[int, Patch]]] = defaultdict(list)
        for row, patch in rows:
            by_site[patch.site].append((row, patch))
        edits: dict[Site, Edit] = {}
        for site, members in by_site.items():
            index = to_device([r for r, _ in members], dev)  # (n,)
            mask = torch.stack([masks[p.positions] for _, p in members])  # (n, pos')
            if site.component == "head":
                heads = torch.zeros(len(members), self.anatomy.n_heads, dtype=torch.bool)
                heads[torch.arange(len(members)), [p.head for _, p in members]] = True
                mask = mask[:, :, None] & heads[:, None, :]  # (n, pos', head)
            # clean: (pos', d_model), heads (pos', head, d_head)
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
        return self._rows_in_memory(length, most=1024)

    def _rows_in_memory(self, length: int, most: int) -> int:
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
                               hooked=self.fused is None, most=most)

    def _resume(self, inputs: _LayerInputs, starts: list[int], edits: dict[Site, Edit],
                options: torch.Tensor | None) -> torch.Tensor:
        """Logits (rows, n_logits), fp32, of rows run from their own layer on through the
        model's layers with hooks: row r joins the batch at layer starts[r] (ascending) with
        the corrupted residual stream entering that layer, so every row costs exactly the
        layers at and after its patch. The rows live in one preallocated residual stream;
        active rows are always a prefix of it (rows come in layer order)."""
        stream = _stream(inputs, starts, 0)  # (rows, pos, d_model)
        active = 0
        with hooked(self.model, self.anatomy, edits):
            for i in range(starts[0], self.anatomy.n_layers):
                active = _join(stream, active, inputs.hidden[i], starts.count(i))
                x = stream[:active]  # (active, pos, d_model)
                out = self.anatomy.layer(i)(x, *inputs.args[i], **inputs.kwargs[i])
                x.copy_(out if isinstance(out, torch.Tensor) else out[0])
        return self.anatomy.unembed(stream[:, -1], options).float()

    def _resume_fused(self, inputs: _LayerInputs, starts: list[int], begin: int,
                      edits: dict[Site, Edit], options: torch.Tensor | None,
                      prefixes: dict[tuple[int, int], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """`_resume` through the fused layers, on positions `begin`.. only: each layer
        updates the active rows in place, with the corrupted run's queries, keys and values
        before `begin` in front (computed once per layer and begin, kept in `prefixes`); the
        final layer computes keys and values at every position but the rest only at the
        last, the one position the logits read."""
        fused, final = self.fused, self.anatomy.n_layers - 1
        assert fused is not None
        stream = _stream(inputs, starts, begin)  # (rows, pos - begin, d_model)
        active = 0
        for i in range(starts[0], final + 1):
            active = _join(stream, active, inputs.hidden[i][:, begin:], starts.count(i))
            prefix = None
            if begin:
                if (i, begin) not in prefixes:
                    prefixes[i, begin] = fused.prefix_qkv(i, inputs.hidden[i][:, :begin],
                                                         inputs.kwargs[i])
                prefix = prefixes[i, begin]  # (1, begin, heads, d_head) each
            fused.layer(i, stream[:active], inputs.kwargs[i], edits, last_only=i == final,
                        prefix=prefix)
        return self.anatomy.unembed(stream[:, -1], options).float()


def _stream(inputs: _LayerInputs, starts: list[int], begin: int) -> torch.Tensor:
    """An unset residual stream (rows, pos - begin, d_model) for one row per start, in the
    recorded stream's dtype and device."""
    first = inputs.hidden[starts[0]]  # (1, pos, d_model)
    return torch.empty(len(starts), first.shape[1] - begin, first.shape[2], dtype=first.dtype,
                       device=first.device)


def _join(stream: torch.Tensor, active: int, hidden: torch.Tensor, joining: int) -> int:
    """Rows joining at this layer start from the corrupted stream `hidden` (1, pos', d_model),
    written after the `active` rows of `stream` (rows, pos', d_model); returns the new
    number of active rows."""
    if joining:
        stream[active : active + joining] = hidden
    return active + joining


def _pick(logits: torch.Tensor, options: torch.Tensor | None) -> torch.Tensor:
    """The option tokens' logits (..., n_options) of `logits` (..., vocab), all if None,
    in fp32."""
    return (logits if options is None else logits[..., options]).float()


def packed_tokens(item: Item, key_share: float = 0.0) -> float:
    """Tokens one prompt pair adds to a packed batch: its clean and corrupted prompts, each
    patch's row from its begin on, and `key_share` of a token for each key a row attends
    to (its whole prompt)."""
    n = len(item.clean_ids)
    begins = patch_begins(position_masks(n, item.identity), item.clean_ids, item.corrupt_ids)
    return (2 * n + sum(n - begins[p.positions] for p in item.patches)
            + key_share * n * len(item.patches))


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
    """The first position a patch with this position `mask` (pos,) can change: the first
    patched position at or after the prompts' first difference (before it, clean and
    corrupted activations are equal, so patching them changes nothing). The last position
    where the patch changes nothing at all: the logits must still be computed there."""
    changed = mask[first_difference:].nonzero()
    last = len(mask) - 1
    return last if len(changed) == 0 else min(first_difference + int(changed[0]), last)


def rows_for_memory(anatomy: Anatomy, d_ff: int, length: int, element_size: int,
                    budget: int, hooked: bool = False, most: int = 1024) -> int:
    """Rows of one forward whose activations fit `budget` bytes: per row and position, the
    residual stream, normed input, q/k/v, attention and MLP outputs and the gate/up
    intermediates, held together at a layer's peak (twice that on the hooked path, whose
    edits copy tensors and whose modules keep more alive); between 1 and `most`."""
    per_row = token_width(anatomy, d_ff) * length * element_size * (2 if hooked else 1)
    return max(1, min(most, budget // max(per_row, 1)))


def token_width(a: Anatomy, d_ff: int) -> int:
    """Elements one computed token holds at a layer's peak (`rows_for_memory`)."""
    return (4 * a.d_model + (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
            + a.n_heads * a.head_dim + 3 * d_ff)


def to_device(data: torch.Tensor | Sequence[Any], device: torch.device) -> torch.Tensor:
    """A small host tensor (or nested list) on `device` without a device sync: pinned and
    copied asynchronously on CUDA, so the host can queue the next work while the GPU runs."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


T = TypeVar("T")
_END: Any = object()


def one_ahead(items: Iterable[T]) -> Iterator[T]:
    """Yield each item once the next has been produced: the host queues question k+1 on a
    GPU before reading question k's results back (a device sync), so the GPU never idles."""
    it = iter(items)
    previous = next(it, _END)
    for item in it:
        yield previous
        previous = item
    if previous is not _END:
        yield previous


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    """`items` in consecutive pieces of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
