"""Rows of many prompt pairs in one forward: the engine's path on a GPU.

`PatchingEngine.run` patches one prompt pair at a time. With the few patches per pair an
audit plan verifies (a handful per sweep), that forward is too small for a GPU: the host
takes longer to queue a layer's kernels than the GPU takes to run them. `PackedRunner` runs
the prompt pairs of a batch together, in one flat token dimension:

- the recording runs (every pair's clean and corrupted prompt) are one packed sequence
  batch, with variable-length causal attention over each prompt;
- every (prompt pair, patch) row then holds only the positions its patch can change
  (`patch_begin` on), resumed at its patch's layer from the corrupted run's residual stream
  there; its attention reads the corrupted run's keys and values of the positions before
  them (bottom-right causal attention over prefix + own positions);
- edits are index writes of the clean run's values, gathered while it ran;
- the final layer computes queries, o_proj and MLP at each row's last position only.

The arithmetic per token is `FusedDecoder.layer`'s, op for op; only the grouping of tokens
into matmuls differs, so results match the per-pair engine to rounding (tests/test_packed.py,
against it and the reference loop, on the CPU with a per-sequence attention loop; on a GPU
variable-length flash attention runs every sequence in one kernel).

Shapes in comments: `T` a packed token count, `H`/`Hkv` query/key-value heads, `D` d_head.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from governance.models.architectures import Anatomy
from governance.patching.fused import FusedDecoder, rms_norm, rotate


@dataclass(frozen=True)
class Item:
    """One prompt pair and the patches to run on it."""

    clean_ids: Sequence[int]
    corrupt_ids: Sequence[int]
    identity: Sequence[int]
    patches: Sequence  # Patch


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether variable-length flash attention runs here (CUDA, half precision)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: np.ndarray,
                     cu_k: np.ndarray, causal: bool, scale: float,
                     flash: bool) -> torch.Tensor:
    """Attention of packed sequences: q (Tq, H, D) over k, v (Tk, Hkv, D), sequence s the
    queries cu_q[s]:cu_q[s+1] and keys cu_k[s]:cu_k[s+1]; `causal` aligns each sequence's
    queries with its last keys (bottom-right), as a prompt's last positions over the whole
    prompt. `flash`: one variable-length flash kernel; else one SDPA call per sequence."""
    if flash:
        return _flash_varlen(q, k, v, cu_q, cu_k, causal, scale)
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    for s in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d]))
        mask = None
        if causal and b - a > 1:
            mask = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).tril(
                (d - c) - (b - a))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)  # (1, H, n, D)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _flash_varlen(q, k, v, cu_q, cu_k, causal, scale):
    from torch.nn.attention.varlen import varlen_attn

    cq = _to_device(torch.from_numpy(cu_q.astype(np.int32)), q.device)
    ck = _to_device(torch.from_numpy(cu_k.astype(np.int32)), q.device)
    max_q, max_k = int(np.diff(cu_q).max()), int(np.diff(cu_k).max())
    params = _varlen_params()
    kwargs: dict = {"scale": scale} if "scale" in params else {}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)  # causal, aligned to the last key (flash's convention)
    return varlen_attn(q, k, v, cq, ck, max_q, max_k, **kwargs)


@functools.cache
def _varlen_params() -> frozenset[str]:
    """`varlen_attn`'s keyword arguments: causal attention is `is_causal=True` in some torch
    releases and `window_size=(-1, 0)` in others."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, asynchronously (pinned) on CUDA, so the host never waits."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges start..start+length, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + np.arange(total) - offsets


@dataclass
class _EditIndex:
    """Where one site's edits write (dst, in the rows' packed tokens; for the final layer's
    sites past resid_pre, row numbers), what they read (src, in the recording's packed
    tokens), and for heads which head."""

    dst: np.ndarray
    src: np.ndarray
    head: np.ndarray | None


@dataclass
class _Layout:
    """Host-side index arrays of one batch, built once before any compute."""

    lengths: np.ndarray  # (items,)
    rec_off: np.ndarray  # (2 items + 1,): clean prompts, then corrupted, packed
    n_clean: int  # tokens of the clean prompts (the corrupted ones follow)
    row_item: np.ndarray  # (rows,), rows ordered by start layer
    row_patch: np.ndarray  # (rows,): the patch's index in its item
    row_begin: np.ndarray
    row_start: np.ndarray  # the layer a row joins at
    row_off: np.ndarray  # (rows + 1,): the rows' own tokens, packed
    key_off: np.ndarray  # (rows + 1,): each row's keys (prefix + own), packed
    own_key: np.ndarray  # (row tokens,): where each own token's key goes
    prefix_key: np.ndarray  # (prefix tokens,): where each prefix key goes
    prefix_src: np.ndarray  # (prefix tokens,): the corrupted token it is (corrupt-local)
    prefix_off: np.ndarray  # (rows + 1,)
    row_pos: np.ndarray  # (row tokens,): each own token's position in its prompt
    rec_pos: np.ndarray  # (recording tokens,)
    active: np.ndarray  # (layers,): rows joined by each layer
    joins: dict[int, np.ndarray]  # layer -> recording tokens of the rows joining there
    edits: dict[tuple[str, int], _EditIndex]


class PackedRunner:
    """The rows of a batch of prompt pairs through the fused layers, packed (see the module
    docstring). `flash`: variable-length flash attention (CUDA, half precision); else a
    per-sequence SDPA loop (any device; how the CPU tests run it)."""

    def __init__(self, fused: FusedDecoder, anatomy: Anatomy, *, flash: bool) -> None:
        self.fused = fused
        self.anatomy = anatomy
        self.flash = flash
        self._rope = (torch.compile(_rope_tokens) if fused.compiled else _rope_tokens)

    # -- the batch's layout (host) ----------------------------------------------------------

    def layout(self, items: Sequence[Item]) -> _Layout:
        from governance.patching.engine import patch_begins, position_masks

        n_layers = self.anatomy.n_layers
        lengths = np.array([len(it.clean_ids) for it in items], dtype=np.int64)
        rec_off = np.concatenate([[0], np.cumsum(np.concatenate([lengths, lengths]))])
        n_clean = int(lengths.sum())
        masks, begins = [], []
        for it in items:
            m = position_masks(len(it.clean_ids), it.identity)
            masks.append({k: v.numpy() for k, v in m.items()})
            begins.append(patch_begins(m, it.clean_ids, it.corrupt_ids))
        rows = [(p.layer, j, i, begins[j][p.positions])
                for j, it in enumerate(items) for i, p in enumerate(it.patches)]
        rows.sort(key=lambda r: r[0])  # stable: by start layer, then item, then patch
        row_start = np.array([r[0] for r in rows], dtype=np.int64)
        row_item = np.array([r[1] for r in rows], dtype=np.int64)
        row_patch = np.array([r[2] for r in rows], dtype=np.int64)
        row_begin = np.array([r[3] for r in rows], dtype=np.int64)
        row_len = lengths[row_item] - row_begin if rows else np.zeros(0, dtype=np.int64)
        row_off = np.concatenate([[0], np.cumsum(row_len)])
        key_len = lengths[row_item] if rows else np.zeros(0, dtype=np.int64)
        key_off = np.concatenate([[0], np.cumsum(key_len)])
        own_key = _ranges(key_off[:-1] + row_begin, row_len)
        prefix_key = _ranges(key_off[:-1], row_begin)
        corrupt_start = rec_off[len(items):-1] - n_clean  # each item's corrupted prompt
        prefix_src = _ranges(corrupt_start[row_item] if rows else row_begin, row_begin)
        prefix_off = np.concatenate([[0], np.cumsum(row_begin)])
        row_pos = _ranges(row_begin, row_len)
        rec_pos = _ranges(np.zeros(2 * len(items), dtype=np.int64),
                          np.concatenate([lengths, lengths]))
        active = np.searchsorted(row_start, np.arange(n_layers), side="right")
        joins = {}
        for layer in np.unique(row_start):
            sel = np.nonzero(row_start == layer)[0]
            joins[int(layer)] = _ranges(rec_off[len(items) + row_item[sel]] + row_begin[sel],
                                        row_len[sel])
        edits = self._edit_index(items, masks, rows, row_off, rec_off, lengths)
        return _Layout(lengths, rec_off, n_clean, row_item, row_patch, row_begin, row_start,
                       row_off, key_off, own_key, prefix_key, prefix_src, prefix_off, row_pos,
                       rec_pos, active, joins, edits)

    def _edit_index(self, items, masks, rows, row_off, rec_off, lengths):
        final = self.anatomy.n_layers - 1
        found: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray, int | None]]] = {}
        for r, (layer, j, i, begin) in enumerate(rows):
            p = items[j].patches[i]
            mask = masks[j][p.positions]
            if layer == final and p.component != "resid_pre":
                if not mask[-1]:
                    continue
                dst = np.array([r])  # the final layer runs each row's last position only
                src = np.array([rec_off[j] + lengths[j] - 1])
            else:
                pos = np.nonzero(mask[begin:])[0]  # own positions past the begin
                dst = row_off[r] + pos
                src = rec_off[j] + begin + pos
            found.setdefault((p.component, layer), []).append((dst, src, p.head))
        out = {}
        for site, parts in found.items():
            dst = np.concatenate([d for d, _, _ in parts])
            src = np.concatenate([s for _, s, _ in parts])
            head = (np.concatenate([np.full(len(d), h) for d, _, h in parts])
                    if site[0] == "head" else None)
            out[site] = _EditIndex(dst, src, head)
        return out

    # -- compute ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, items: Sequence[Item], options: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Clean logits (items, n_logits), corrupted logits (items, n_logits) and each item's
        patched logits (its patches, n_logits), fp32, of one batch."""
        fused, a = self.fused, self.anatomy
        fused.refresh()
        lay = self.layout(items)
        dev = fused.weights(0).ln1.device
        cos_tab, sin_tab, pos_base = self._rope_tables(lay.lengths)

        def put(x: np.ndarray) -> torch.Tensor:
            return _to_device(torch.from_numpy(np.ascontiguousarray(x)), dev)

        item_of_rec = np.repeat(np.concatenate([np.arange(len(items))] * 2),
                                np.concatenate([lay.lengths, lay.lengths]))
        rec_rope = put(pos_base[item_of_rec] + lay.rec_pos)
        row_rope = put(pos_base[lay.row_item[np.repeat(np.arange(len(lay.row_item)),
                                                      np.diff(lay.row_off))]] + lay.row_pos)
        idx = _DeviceIndex(lay, put)

        # the recording runs: clean and corrupted prompts, packed; keep what rows need
        ids = torch.cat([torch.as_tensor(list(it.clean_ids)) for it in items]
                        + [torch.as_tensor(list(it.corrupt_ids)) for it in items])
        x = fused.embed(put(ids.numpy()))  # (T_rec, d_model)
        cu_rec = lay.rec_off
        sources: dict[tuple[str, int], torch.Tensor] = {}
        joins: dict[int, torch.Tensor] = {}
        kv_store: list[tuple[torch.Tensor, torch.Tensor]] = []
        cos, sin = cos_tab[rec_rope], sin_tab[rec_rope]  # (T_rec, D)
        for i in range(a.n_layers):
            if i in idx.joins:
                joins[i] = x[idx.joins[i]]
            self._keep(sources, idx, ("resid_pre", i), x)
            w = fused.weights(i)
            h = fused.kernels.rms_norm(x, w.ln1, w.eps)
            q, k, v = self._qkv(i, h, cos, sin, cos, sin)
            kv_store.append((k[lay.n_clean:].clone(), v[lay.n_clean:].clone()))
            z = packed_attention(q, k, v, cu_rec, cu_rec, True, w.scaling, self.flash)
            self._finish_layer(w, x, z, lambda c, t, i=i: self._keep(sources, idx, (c, i), t))
        ends = put(lay.rec_off[1:] - 1)
        logits = a.unembed(x[ends], options).float()  # (2 items, n_logits)
        n = len(items)
        clean, corrupt = logits[:n], logits[n:]
        if not len(lay.row_item):
            return clean, corrupt, [logits[:0] for _ in items]

        # the rows, from the first layer one joins at
        patched = self._rows(lay, idx, joins, sources, kv_store, cos_tab[row_rope],
                             sin_tab[row_rope], options)  # (rows, n_logits)
        order = np.lexsort((lay.row_patch, lay.row_item))  # back to item, patch order
        patched = patched[put(order)]
        counts = [len(it.patches) for it in items]
        return clean, corrupt, list(torch.split(patched, counts))

    def _rows(self, lay: _Layout, idx: _DeviceIndex, joins, sources, kv_store, cos, sin,
              options) -> torch.Tensor:
        fused, a = self.fused, self.anatomy
        final = a.n_layers - 1
        stream = torch.empty(int(lay.row_off[-1]), a.d_model, dtype=kv_store[0][0].dtype,
                             device=kv_store[0][0].device)  # (T_rows, d_model)
        first = int(lay.row_start[0])
        for i in range(first, final + 1):
            n_act = int(lay.active[i])
            t_act = int(lay.row_off[n_act])
            if i in joins:
                begin = int(lay.row_off[np.searchsorted(lay.row_start, i, side="left")])
                stream[begin:t_act] = joins[i]
            x = stream[:t_act]
            self._apply(sources, idx, ("resid_pre", i), x)
            w = fused.weights(i)
            h = fused.kernels.rms_norm(x, w.ln1, w.eps)
            last = i == final
            ends = idx.row_ends[:n_act] if last else None
            q, k, v = self._qkv(i, h, cos[:t_act], sin[:t_act], cos[:t_act], sin[:t_act],
                                q_at=ends)
            keys = int(lay.key_off[n_act])
            k_all = k.new_empty(keys, *k.shape[1:])
            v_all = v.new_empty(keys, *v.shape[1:])
            k_all[idx.own_key[:t_act]] = k
            v_all[idx.own_key[:t_act]] = v
            n_prefix = int(lay.prefix_off[n_act])
            if n_prefix:
                src = idx.prefix_src[:n_prefix]
                k_all[idx.prefix_key[:n_prefix]] = kv_store[i][0][src]
                v_all[idx.prefix_key[:n_prefix]] = kv_store[i][1][src]
            cu_k = lay.key_off[: n_act + 1]
            if last:  # one query per row, its last position: it attends to every key
                z = packed_attention(q, k_all, v_all, np.arange(n_act + 1), cu_k, False,
                                     w.scaling, self.flash)
                x = x[ends]  # (rows, d_model): a copy; the stream is not read again
            else:
                z = packed_attention(q, k_all, v_all, lay.row_off[: n_act + 1], cu_k, True,
                                     w.scaling, self.flash)
            self._finish_layer(w, x, z, lambda c, t, i=i: self._apply(sources, idx, (c, i), t))
        return a.unembed(x, options).float()  # x: the final layer's rows, (rows, d_model)

    def _qkv(self, i, h, cos_q, sin_q, cos_k, sin_k, q_at: torch.Tensor | None = None):
        """Rotated queries (Tq, H, D), keys and values (T, Hkv, D) of normed stream h (T, d);
        queries only at rows `q_at` of h where given."""
        w, a = self.fused.weights(i), self.anatomy
        dq, dkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        if q_at is None:
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q, k, v = qkv[:, :dq], qkv[:, dq : dq + dkv], qkv[:, dq + dkv :]
        else:
            q = F.linear(h[q_at], w.qkv[:dq], None if w.qkv_bias is None else w.qkv_bias[:dq])
            kv = F.linear(h, w.qkv[dq:], None if w.qkv_bias is None else w.qkv_bias[dq:])
            k, v = kv[:, :dkv], kv[:, dkv:]
            cos_q, sin_q = cos_q[q_at], sin_q[q_at]
        return self._rope(q, k, v, cos_q, sin_q, cos_k, sin_k, a.n_heads, a.n_kv_heads,
                          a.head_dim, w.q_norm, w.k_norm, w.qk_eps)

    def _finish_layer(self, w, x: torch.Tensor, z: torch.Tensor, at) -> None:
        """The layer after attention, updating the stream x (T, d_model) in place from the
        heads' outputs z (T, H, D); `at(component, tensor)` sees (recording) or edits (rows)
        the head, attn_out and mlp_out tensors in turn."""
        at("head", z)
        attn_out = F.linear(z.reshape(len(z), -1), w.o, w.o_bias)
        at("attn_out", attn_out)
        h = self.fused.kernels.add_rms_norm(x, attn_out, w.ln2, w.eps)
        mlp_out = self._mlp(w, h)
        at("mlp_out", mlp_out)
        x.add_(mlp_out)

    def _mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        up = self.fused.kernels.silu_mul(F.linear(h, w.gate_up, w.gate_up_bias))
        return F.linear(up, w.down, w.down_bias)

    @staticmethod
    def _keep(sources, idx: _DeviceIndex, site, t: torch.Tensor) -> None:
        """The clean run's values an edit at `site` will write, gathered from t."""
        e = idx.edits.get(site)
        if e is not None:
            sources[site] = t[e.src] if e.head is None else t[e.src, e.head]

    @staticmethod
    def _apply(sources, idx: _DeviceIndex, site, t: torch.Tensor) -> None:
        e = idx.edits.get(site)
        if e is None:
            return
        if e.head is None:
            t[e.dst] = sources[site]
        else:
            t[e.dst, e.head] = sources[site]

    def _rope_tables(self, lengths: np.ndarray):
        """cos and sin tables (Σ distinct lengths, D) with every distinct prompt length's
        rotary embeddings as the model computes them for that length, and each item's first
        row in them."""
        distinct = sorted({int(n) for n in lengths})
        cos, sin, base = [], [], {}
        at = 0
        for n in distinct:
            kw = self.fused.layer_kwargs(n)
            if kw is None:
                raise ValueError(f"prompts of {n} tokens need the model's own sliding-window "
                                 "mask; the packed path cannot run them")
            c, s = kw["position_embeddings"]  # (1, n, D)
            cos.append(c[0])
            sin.append(s[0])
            base[n] = at
            at += n
        return (torch.cat(cos), torch.cat(sin),
                np.array([base[int(n)] for n in lengths], dtype=np.int64))


class _DeviceIndex:
    """The layout's index arrays on the device, copied once per batch."""

    def __init__(self, lay: _Layout, put) -> None:
        self.joins = {i: put(v) for i, v in lay.joins.items()}
        self.own_key = put(lay.own_key)
        self.prefix_key = put(lay.prefix_key)
        self.prefix_src = put(lay.prefix_src)
        self.row_ends = put(lay.row_off[1:] - 1)
        self.edits = {site: _EditIndex(put(e.dst), put(e.src),
                                       None if e.head is None else put(e.head))
                      for site, e in lay.edits.items()}


def _rope_tokens(q, k, v, cos_q, sin_q, cos_k, sin_k, n_heads: int, n_kv: int, d_head: int,
                 q_norm, k_norm, eps: float):
    """Packed queries (Tq, dq) and keys, values (T, dkv): per-head q/k norms where the model
    has them, RoPE at each token's own position (cos/sin (T, D)); (T, heads, D) out."""
    q = q.view(q.shape[0], n_heads, d_head)
    k = k.view(k.shape[0], n_kv, d_head)
    v = v.view(v.shape[0], n_kv, d_head)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    q = rotate(q[None], cos_q[None], sin_q[None])[0]
    k = rotate(k[None], cos_k[None], sin_k[None])[0]
    return q, k, v
