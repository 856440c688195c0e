"""Loading a causal LM for auditing: from a Hugging Face directory, a GGUF file or MLflow.

Every source ends as a `LoadedModel`: the model in eval mode with gradients off, on the
requested device and dtype, a fast tokenizer (patching needs character offsets), the
model's `Anatomy`, and an `identity` dict that an audit records so its results can be tied
to exactly the weights that produced them. Nothing is fetched from a model hub: local paths
load with `local_files_only=True`, and MLflow URIs resolve through the configured tracking
server and artifact store.

MLflow models are registered by other teams, so nothing in them may run code here. They are
downloaded and read as files: the `MLmodel` file with `yaml.safe_load`, the weights and the
tokenizer with transformers from the directories the transformers flavour saves them in.
MLflow's own loaders are never called, so the model's logged `code/` folder is never put on
`sys.path` and nothing in it is imported, whatever `trust_remote_code` says. Any request for
classes that transformers does not ship (in the flavour or in a saved `*config.json`) is
refused unless `trust_remote_code=True`, which lets transformers run the model directory's
own code and nothing else. Weights load from safetensors only unless `allow_pickle=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from governance.errors import ModelLoadError
from governance.models.architectures import LAYOUTS, SUPPORTED_ARCHITECTURES, Anatomy, anatomy_of
from governance.models.memory import refuse_if_too_large
from governance.models.mlflow_artifacts import (
    COMPONENTS_DIR,
    flavor_dirs,
    relative,
    transformers_flavor,
)
from governance.models.safety import (
    check_weights,
    config_code_requests,
    flavor_code_requests,
    refuse_custom_code,
)
from governance.redaction import redact

__all__ = ["LoadedModel", "load_model", "save_as_hf_dir", "weights_fingerprint"]

_MLFLOW_SCHEMES = ("models:/", "runs:/")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_FINGERPRINT_ELEMENTS = 4096
_EXPECTED = (
    "expected a Hugging Face model directory (with config.json), a .gguf file, or an MLflow "
    "model URI (models:/name/version, models:/name@alias, models:/m-<id>, runs:/<run_id>/<path>)"
)


@dataclass
class LoadedModel:
    """A causal LM ready for auditing, with its tokenizer, anatomy and identity record."""

    model: nn.Module
    tokenizer: Any  # a transformers fast tokenizer
    anatomy: Anatomy
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, source: str) -> LoadedModel:
        """Wrap a model already in memory (a notebook's, a test's) with its anatomy and
        identity record; `source` says where it came from."""
        anatomy = anatomy_of(model)
        return cls(model, tokenizer, anatomy, _identity(model, anatomy, source, "in_memory"))


def load_model(
    source: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its fast tokenizer for auditing.

    `source` is a Hugging Face model directory, a `.gguf` file (dequantised by transformers
    to fp32), or an MLflow model URI (`models:/name/version`, `models:/name@alias`,
    `models:/m-<id>`, `runs:/<run_id>/<path>`) of a model logged with
    `mlflow.transformers.log_model`, which is read as files (see the module docstring).
    `device` None/"auto" picks CUDA when present; `dtype` None picks bfloat16 on CUDA and
    float32 on CPU.

    A directory or MLflow model that asks for classes transformers does not ship (`auto_map`,
    `custom_pipelines`, unknown class names in a `*config.json` or in the MLflow flavour) is
    refused unless `trust_remote_code=True`; an MLflow model's `code/` folder is never
    imported either way. Weights load from safetensors only: pickle-based weights
    (`pytorch_model.bin`, `.pt`, `.ckpt`, ...) are refused unless `allow_pickle=True`. A
    model whose safetensors weights need more memory at `dtype` than the device has free is
    refused before loading (`governance.models.memory`). Any failure, including an
    unsupported architecture, raises `ModelLoadError` naming the source.
    """
    target_device = _resolve_device(device)
    target_dtype = _resolve_dtype(dtype, target_device)
    text = os.fspath(source)
    if isinstance(text, bytes):  # os.PathLike[bytes]
        text = text.decode()

    extra: dict[str, Any] = {}
    if text.startswith(_MLFLOW_SCHEMES):
        kind = "mlflow"
        shown = redact(text)
        model, tokenizer, extra = _load_mlflow(
            text, shown, target_device, target_dtype, trust_remote_code, attn_implementation,
            allow_pickle,
        )
    else:
        path = Path(text).expanduser()
        shown = str(path.resolve()) if path.exists() else text
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"model source {text!r} has no config.json: {_EXPECTED}")
            kind = "hf_dir"
            requests = config_code_requests([(path, "")])
            refuse_custom_code(requests, f"model source {text!r}", trust_remote_code)
            _check_config_model_type(path / "config.json", text)
            use_safetensors = check_weights(path, "", f"model source {text!r}", allow_pickle)
            refuse_if_too_large(path, target_device, target_dtype, f"model source {text!r}")
            model, tokenizer = _load_pretrained(
                path, path, text, target_dtype, trust_remote_code, attn_implementation,
                use_safetensors=use_safetensors,
            )
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"model source {text!r} is a file but not a .gguf file: {_EXPECTED}"
                )
            kind = "gguf"
            model, tokenizer = _load_pretrained(
                path.parent, path.parent, text, target_dtype, trust_remote_code,
                attn_implementation, gguf_file=path.name,
            )
        elif re.match(r"^[A-Za-z][\w+.-]*:/", text):
            raise ModelLoadError(
                f"model source {redact(text)!r} uses an unsupported URI scheme: {_EXPECTED}"
            )
        else:
            raise ModelLoadError(f"model source {redact(text)!r} does not exist: {_EXPECTED}")

    anatomy = anatomy_of(model)  # raises ModelLoadError listing the supported architectures
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"model source {shown!r}: the tokenizer ({type(tokenizer).__name__}) is not a fast "
            "tokenizer; persona patching needs character offsets, which only fast "
            "(tokenizers-backed) tokenizers provide"
        )
    try:
        model.to(device=target_device, dtype=target_dtype)
    except Exception as exc:  # e.g. CUDA out of memory
        raise ModelLoadError(
            f"model source {shown!r}: could not move the model to {target_device} "
            f"as {_dtype_name(target_dtype)}: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    identity = {**_identity(model, anatomy, shown, kind), **extra}
    return LoadedModel(model=model, tokenizer=tokenizer, anatomy=anatomy, identity=identity)


def save_as_hf_dir(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str]) -> Path:
    """Write a model (typically dequantised from GGUF) and tokenizer as safetensors + config.

    A GGUF file takes seconds to dequantise on every load; converting it once gives a plain
    directory that reloads in well under a second with identical logits. transformers refuses
    to save a GGUF-loaded model while its GGUF quantizer is attached, so it is detached here
    (the weights are already dequantised, so nothing is lost).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def weights_fingerprint(model: nn.Module) -> str:
    """A sampled sha256 fingerprint of the weights (not a hash of every byte).

    For every named parameter in name order it hashes the name, shape, dtype and the first
    4096 elements (flattened, as float32 on CPU). That is cheap even for large models and
    catches a different checkpoint or a changed dtype, but an edit beyond the first 4096
    elements of every tensor would go unnoticed.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            digest.update(name.encode())
            digest.update(b"\0")
            digest.update(str(tuple(param.shape)).encode())
            digest.update(b"\0")
            digest.update(str(param.dtype).encode())
            digest.update(b"\0")
            head = param.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS]
            digest.update(head.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _resolve_device(device: str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ModelLoadError(
            f"unsupported device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
            "device(s) are available"
        )
    return parsed


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = _DTYPES.get(str(dtype).lower())
    if resolved is None:
        raise ModelLoadError(
            f"unsupported dtype {dtype!r}: expected one of {', '.join(_DTYPES)}"
        )
    return resolved


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_config_model_type(config_path: Path, source: str) -> None:
    """Refuse an unsupported architecture before loading (possibly many GB of) weights."""
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model source {source!r}: cannot read {config_path}: {exc}") from exc
    if model_type not in LAYOUTS:
        raise ModelLoadError(
            f"model source {source!r}: unsupported architecture {model_type!r}; supported "
            f"model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _load_pretrained(
    model_dir: Path,
    tokenizer_dir: Path,
    source: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str,
    *,
    gguf_file: str | None = None,
    use_safetensors: bool | None = None,
) -> tuple[nn.Module, Any]:
    """Model and tokenizer from local directories, optionally from a GGUF file in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    weights: dict[str, Any] = {}
    if use_safetensors is not None:
        weights["use_safetensors"] = use_safetensors
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation, **weights, **common
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load the model from {source!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **common)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer from {source!r}: {exc}") from exc
    return model, tokenizer


def _load_mlflow(
    uri: str,
    shown: str,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str,
    allow_pickle: bool,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Model, tokenizer and identity fields of an MLflow transformers-flavour model, read as
    files from a temporary download that is removed afterwards."""
    import mlflow.artifacts

    what = f"MLflow model {shown!r}"
    with tempfile.TemporaryDirectory(prefix="persona-gov-mlflow-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:
            raise ModelLoadError(
                f"could not resolve the MLflow model {shown!r}: {_scrub(str(exc), uri, shown)}"
            ) from exc
        root = Path(local)
        flavor, meta = transformers_flavor(root, what)
        model_dir, tokenizer_dir = flavor_dirs(root, flavor, what)
        scanned = [(model_dir, relative(model_dir, root))]
        components = root / COMPONENTS_DIR
        if components.is_dir():
            scanned += [
                (sub, relative(sub, root)) for sub in sorted(components.iterdir()) if sub.is_dir()
            ]
        requests = flavor_code_requests(flavor) + config_code_requests(scanned)
        refuse_custom_code(requests, what, trust_remote_code)
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(
                f"{what}: its model directory {relative(model_dir, root)} has no config.json"
            )
        _check_config_model_type(model_dir / "config.json", shown)
        use_safetensors = check_weights(
            model_dir, relative(model_dir, root), what, allow_pickle
        )
        refuse_if_too_large(model_dir, device, dtype, what)
        model, tokenizer = _load_pretrained(
            model_dir, tokenizer_dir, shown, dtype, trust_remote_code, attn_implementation,
            use_safetensors=use_safetensors,
        )
    extra: dict[str, Any] = {"loaded_as": "files"}
    for key, value in (
        ("flavor_transformers_version", flavor.get("transformers_version")),
        ("mlflow_version", meta.get("mlflow_version")),
        ("mlflow_model_id", meta.get("model_id")),
    ):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            extra[key] = str(value)[:200]
    return model, tokenizer, extra


def _scrub(message: str, uri: str, shown: str) -> str:
    """An error message with the URI as shown and every credential redacted."""
    return redact(message.replace(uri, shown))


def _identity(model: nn.Module, anatomy: Anatomy, source: str, kind: str) -> dict[str, Any]:
    """A JSON-serialisable record of which model this is, for the audit trail."""
    import transformers

    config = model.config.to_dict()  # type: ignore[attr-defined]
    config.pop("_name_or_path", None)  # where it was loaded from: in `source`, not the config
    config_json = json.dumps(config, sort_keys=True, default=str)
    param = next(model.parameters())
    return {
        "source": source,
        "source_kind": kind,
        "model_class": type(model).__name__,
        "model_type": anatomy.model_type,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_layers": anatomy.n_layers,
        "n_heads": anatomy.n_heads,
        "n_kv_heads": anatomy.n_kv_heads,
        "head_dim": anatomy.head_dim,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "weights_fingerprint": weights_fingerprint(model),
        "dtype": _dtype_name(param.dtype),
        "device": str(param.device),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


# -- pinned model assets --------------------------------------------------------------------


def pinned_model_dir(name: str) -> Path:
    """A safetensors directory converted once from the asset's GGUF (loads in under a second)."""
    from governance.inputs.assets import ASSETS, AssetError, cache_dir, fetch

    asset = ASSETS.get(name)
    if asset is None or asset.kind != "gguf":
        raise AssetError(f"{name!r} is not a model asset")
    out = cache_dir() / name / "hf"
    if (out / "config.json").exists():
        return out
    loaded = load_model(fetch(name), device="cpu", dtype="float32")
    partial = out.with_name(f"hf.{os.getpid()}.partial")  # this process's own
    shutil.rmtree(partial, ignore_errors=True)
    save_as_hf_dir(loaded.model, loaded.tokenizer, partial)
    try:
        partial.rename(out)
    except OSError:  # another process converted it first: theirs is the same
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return out


def resolve_model(source: str) -> str:
    """A pinned model asset's name (e.g. `smollm2-135m-instruct`) to its converted local
    directory; any other source (a directory, a .gguf file, an MLflow URI) unchanged."""
    from governance.inputs.assets import ASSETS

    asset = ASSETS.get(source)
    if asset is None or asset.kind != "gguf":
        return source
    return str(pinned_model_dir(source))
