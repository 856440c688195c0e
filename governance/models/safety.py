"""What a model's files may ask for, checked before anything is loaded: custom classes (an
`auto_map`, a pipeline, tokenizer or processor class transformers does not ship) and
pickle-based weights. Each request is named in the refusal; only a trusted model may make
them. Reads JSON and YAML only: nothing here imports the model's code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from governance.errors import ModelLoadError

# Keys of a saved *config.json that make transformers fetch or run code of the model's own.
_CODE_KEYS = ("auto_map", "custom_pipelines")
# Keys of a saved *config.json that name classes; each must be a class transformers ships.
_CLASS_KEYS = (
    "architectures", "tokenizer_class", "processor_class", "feature_extractor_type",
    "image_processor_type", "video_processor_type",
)
# Flavour keys that ask MLflow for custom pipelines outright.
_FLAVOR_CODE_KEYS = ("auto_map", "custom_pipeline", "custom_pipelines")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def flavor_code_requests(flavor: dict[str, Any]) -> list[str]:
    """What a transformers flavour asks MLflow for beyond transformers' own classes: every
    `*_type` entry (pipeline_model_type, instance_type, tokenizer_type, processor_type, ...)
    must name a class transformers ships; custom pipelines are asked for outright."""
    requests = []
    for key, value in flavor.items():
        name = str(key)
        if name in _FLAVOR_CODE_KEYS:
            requests.append(f"transformers flavour {name}")
        elif name.endswith("_type") and not (isinstance(value, str) and _ships(value)):
            requests.append(f"transformers flavour {name} {short(value)}")
    return requests


def config_code_requests(directories: list[tuple[Path, str]]) -> list[str]:
    """What the `*config.json` files in `directories` (each with the prefix that names it in
    messages) ask transformers for beyond its own classes."""
    requests = []
    for directory, label in directories:
        for file in sorted(directory.glob("*config.json")):
            where = f"{label}{file.name}"
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise ModelLoadError(f"cannot read {where}: {exc}") from exc
            for key, value in _entries(data):
                if key in _CODE_KEYS:
                    requests.append(f"{where}: {key}")
                elif key in _CLASS_KEYS:
                    names = value if isinstance(value, list) else [value]
                    requests += [
                        f"{where}: {key} {short(name)}"
                        for name in names
                        if name is not None and not (isinstance(name, str) and _ships(name))
                    ]
        if (directory / "custom_generate").exists():
            requests.append(f"{label}custom_generate/")
    return requests


def refuse_custom_code(requests: list[str], what: str, trust_remote_code: bool) -> None:
    if requests and not trust_remote_code:
        raise ModelLoadError(
            f"{what} asks for code that transformers does not ship ({'; '.join(requests)}); "
            "refused: pass trust_remote_code=True to let transformers run the model "
            "directory's own code"
        )


def _entries(data: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every JSON object in `data`, at any depth."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield str(key), value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _ships(name: str) -> bool:
    """Whether transformers itself ships a class of this name."""
    import transformers

    if not name.isidentifier() or name.startswith("_"):
        return False
    try:
        found = getattr(transformers, name)
    except Exception:  # a shipped class whose optional backend is missing still counts
        return name in dir(transformers)
    return isinstance(found, type)


def check_weights(directory: Path, label: str, what: str, allow_pickle: bool) -> bool | None:
    """Refuse weights that transformers would take from elsewhere (a PEFT adapter's base) or
    unpickle (unless `allow_pickle`); returns the `use_safetensors` to load with (True:
    safetensors only; None: transformers' choice)."""
    if (directory / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{what} is a PEFT adapter ({label}adapter_config.json), whose base weights "
            "transformers would load from wherever the adapter names: merge the adapter into "
            "the weights first"
        )
    if allow_pickle:
        return None
    # The file transformers picks: the one config.json names, else model.safetensors, else
    # the safetensors index (whose shards may be any files), else pickle files.
    explicit = _explicit_weights(directory / "config.json")
    index: Path | None = None
    pickled = []
    if explicit is not None:
        if explicit.endswith(".safetensors.index.json"):
            index = directory / explicit
        elif not explicit.endswith(".safetensors"):
            pickled.append(f"{label}config.json transformers_weights {short(explicit)}")
    elif (directory / _SAFE_WEIGHTS[1]).is_file() and not (directory / _SAFE_WEIGHTS[0]).is_file():
        index = directory / _SAFE_WEIGHTS[1]
    elif not (directory / _SAFE_WEIGHTS[0]).is_file():
        pickled += [f"{label}{file.name}" for file in sorted(directory.iterdir())
                    if file.is_file() and file.name.endswith(_PICKLE_SUFFIXES)]
    if index is not None and index.is_file():
        pickled += [f"{label}{index.name} shard {short(shard)}" for shard in _shards(index)
                    if not shard.endswith(".safetensors")]
    if pickled:
        raise ModelLoadError(
            f"{what} has pickle-based weights ({', '.join(pickled)}), which can run code when "
            "loaded; only safetensors weights load unless allow_pickle=True"
        )
    return True


def _explicit_weights(config_path: Path) -> str | None:
    """The weights file a config.json names itself (`transformers_weights`), if any."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # a missing or unreadable config fails later, with transformers' message
    value = config.get("transformers_weights") if isinstance(config, dict) else None
    return None if value is None else str(value)


def _shards(index: Path) -> list[str]:
    """The shard file names a safetensors index maps its tensors to."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return sorted(set(map(str, weight_map.values())))
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {index.name}: {exc}") from exc


def short(value: Any, limit: int = 80) -> str:
    """repr() of a value from an untrusted file, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
