"""Architecture adapters: where the layers, attention, MLP and o_proj of a model live.

The engine only ever talks to an `Anatomy`, so supporting a new transformers architecture
means adding one `_Layout` row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from governance.errors import ModelLoadError


@dataclass(frozen=True)
class _Layout:
    base: str  # attribute path from the CausalLM to the base model
    layers: str  # attribute of the base model holding the decoder layers
    attn: str  # attribute of a layer: the attention module (its output is `attn_out`)
    mlp: str  # attribute of a layer: the MLP module (its output is `mlp_out`)
    o_proj: str  # attribute of the attention module: the output projection
    n_heads: str  # config attribute: number of query heads
    n_kv_heads: str | None  # config attribute: number of key/value heads (None: = n_heads)
    final_norm: str  # attribute of the base model: the norm before the unembedding


_LLAMA_LIKE = _Layout(
    "model", "layers", "self_attn", "mlp", "o_proj", "num_attention_heads",
    "num_key_value_heads", "norm",
)

LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": _Layout("transformer", "h", "attn", "mlp", "c_proj", "n_head", None, "ln_f"),
    "gpt_neox": _Layout(
        "gpt_neox", "layers", "attention", "mlp", "dense", "num_attention_heads", None,
        "final_layer_norm",
    ),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(LAYOUTS))


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Anatomy:
    """The parts of one causal LM that patching touches, with its head geometry."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    logit_softcap: float | None
    _layout: _Layout

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def attn(self, i: int) -> nn.Module:
        return _get(self.layers[i], self._layout.attn)  # type: ignore[return-value]

    def mlp(self, i: int) -> nn.Module:
        return _get(self.layers[i], self._layout.mlp)  # type: ignore[return-value]

    def o_proj(self, i: int) -> nn.Module:
        return _get(self.attn(i), self._layout.o_proj)  # type: ignore[return-value]

    def o_proj_per_head(self, i: int) -> torch.Tensor:
        """o_proj's weight split by query head: (head, d_head, d_model).

        Head h's contribution to the attention output is `z_h @ W[h]` (plus o_proj's bias
        once, not per head), where z_h is its (pos, d_head) slice of the o_proj input.
        """
        proj = self.o_proj(i)
        weight = proj.weight
        if type(proj).__name__ == "Conv1D":  # GPT-2 stores (d_in, d_out)
            w_in_out = weight
        else:  # nn.Linear stores (d_out, d_in)
            w_in_out = weight.T
        return w_in_out.reshape(self.n_heads, self.head_dim, -1)

    def o_proj_bias(self, i: int) -> torch.Tensor | None:
        return getattr(self.o_proj(i), "bias", None)

    def unembed(
        self, hidden: torch.Tensor, token_ids: list[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from final-layer hidden states (..., d_model), optionally only for
        `token_ids`, exactly as the model's own head computes them (norm, lm_head, softcap)."""
        h = self.final_norm(hidden)
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if token_ids is not None:
            weight = weight[token_ids]
            bias = bias[token_ids] if bias is not None else None
        logits = torch.nn.functional.linear(h, weight, bias)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def anatomy_of(model: nn.Module) -> Anatomy:
    """Find the anatomy of a transformers causal LM, or say which architectures we support."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type or "")
    if layout is None:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported "
            f"model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        base = _get(model, layout.base)
        layers = _get(base, layout.layers)
    except AttributeError as exc:
        raise ModelLoadError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the expected "
            f"module {layout.base}.{layout.layers}: {exc}"
        ) from exc
    n_heads = int(getattr(config, layout.n_heads))
    n_kv = n_heads
    if layout.n_kv_heads:
        n_kv = int(getattr(config, layout.n_kv_heads, None) or n_heads)
    d_model = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or d_model // n_heads)
    anatomy = Anatomy(
        model_type=model_type,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_model=d_model,
        layers=layers,
        final_norm=_get(base, layout.final_norm),
        lm_head=model.get_output_embeddings(),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        _layout=layout,
    )
    o_in = anatomy.o_proj_per_head(0)
    if o_in.shape[:2] != (n_heads, head_dim):
        raise ModelLoadError(
            f"{model_type}: o_proj input does not split into {n_heads} heads of {head_dim}"
        )
    return anatomy
