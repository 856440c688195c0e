"""A downloaded MLflow transformers model, read as files: its MLmodel (safe YAML), the
transformers flavour, and where the model weights and tokenizer lie inside the artifacts
(never outside them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from governance.errors import ModelLoadError
from governance.models.safety import short

COMPONENTS_DIR = "components"


def transformers_flavor(root: Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The transformers flavour of the MLmodel file under `root`, and the whole file."""
    import yaml

    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise ModelLoadError(
            f"{what} has no MLmodel file: expected a model logged with "
            "mlflow.transformers.log_model"
        )
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"{what}: cannot read its MLmodel file: {exc}") from exc
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict):
        raise ModelLoadError(f"{what}: its MLmodel file has no flavours")
    flavor = flavors.get("transformers")
    if not isinstance(flavor, dict):
        raise ModelLoadError(
            f"{what} has no transformers flavour (flavours: "
            f"{', '.join(sorted(map(str, flavors))) or 'none'}): expected a model logged with "
            "mlflow.transformers.log_model"
        )
    return flavor, meta


def flavor_dirs(root: Path, flavor: dict[str, Any], what: str) -> tuple[Path, Path]:
    """The model and tokenizer directories a transformers flavour saved under `root`."""
    if flavor.get("peft_adaptor") is not None:
        raise ModelLoadError(
            f"{what} carries a PEFT adapter (transformers flavour peft_adaptor), which this "
            "loader does not apply: log the model with the adapter merged into its weights"
        )
    if flavor.get("local_base_model_path") is not None:
        raise ModelLoadError(
            f"{what} points at base weights outside its artifacts (transformers flavour "
            "local_base_model_path): log the model with its weights"
        )
    if flavor.get("source_model_revision") is not None:
        raise ModelLoadError(
            f"{what} has no weights in its artifacts (logged with save_pretrained=False; "
            "transformers flavour source_model_revision) and models are never downloaded from "
            "a model hub here: log it with save_pretrained=True"
        )
    model_dir = _inside(root, flavor.get("model_binary", "pipeline"), "model_binary", what)
    components = flavor.get("components") or []
    if not isinstance(components, list) or "tokenizer" not in components:
        raise ModelLoadError(
            f"{what} has no tokenizer component (transformers flavour components: "
            f"{short(components)}): expected a model logged with a tokenizer"
        )
    tokenizer_dir = root / COMPONENTS_DIR / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ModelLoadError(
            f"{what} has no tokenizer directory ({COMPONENTS_DIR}/tokenizer)"
        )
    return model_dir, tokenizer_dir


def _inside(root: Path, relative: Any, key: str, what: str) -> Path:
    """`root / relative` when it is a directory that stays inside `root`."""
    base = root.resolve()
    if isinstance(relative, str) and relative and not os.path.isabs(relative):
        path = (root / relative).resolve()
        if path != base and path.is_relative_to(base) and path.is_dir():
            return path
    raise ModelLoadError(
        f"{what}: transformers flavour {key} {short(relative)} is not a directory inside "
        "the model's artifacts"
    )


def relative(path: Path, root: Path) -> str:
    """`path` as a prefix for messages, relative to the artifact root (`model/`)."""
    try:
        return f"{path.resolve().relative_to(root.resolve()).as_posix()}/"
    except ValueError:
        return f"{path}/"
