"""Will the model fit? Its weights' size, read from the safetensors headers before anything is
loaded, against the memory the device has free.

    refuse_if_too_large(model_dir, torch.device("cpu"), torch.float32, "model source 'x'")

A safetensors file starts with an 8-byte little-endian header length and a JSON header that
gives every tensor's dtype and shape, so the size of a model of any size is known from a few
kilobytes, without reading (or trusting the length of) its data. Floating-point tensors are
counted at the dtype the model will be loaded in, the others at their own width.

What a device has free: on CUDA, `torch.cuda.mem_get_info`; on the host, the memory the kernel
reports available (psutil, else /proc/meminfo) within the process's cgroup limit, if any. The
operator can lower it with the environment variable `PERSONA_AUDIT_MEMORY_LIMIT_BYTES` (the
most memory an audit may count on, on any device: for a host shared with other work, or a
limit the process cannot see). A model needing more is refused with `ModelLoadError` naming
both figures; a model that fits may still run out of memory later (activations), which the
nightly's child process turns into an `error` too.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from governance.errors import ModelLoadError

MEMORY_LIMIT_ENV = "PERSONA_AUDIT_MEMORY_LIMIT_BYTES"

_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_WIDTH = {  # bytes per element of each safetensors dtype
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_FLOATING = {"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64"}


def refuse_if_too_large(model_dir: Path, device: torch.device, dtype: torch.dtype,
                        what: str) -> None:
    """Raise `ModelLoadError` when the weights in `model_dir` (safetensors) need more memory
    at `dtype` than `device` has free (and, for a GPU, than the host has free to load them
    through). Weights whose size cannot be read from their headers are not checked here."""
    needed = weights_bytes(model_dir, dtype)
    if needed is None:
        return
    devices = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    for where in devices:
        free, capped = free_bytes(where)
        if needed > free:
            limit = f" (capped by {MEMORY_LIMIT_ENV})" if capped else ""
            name = str(dtype).removeprefix("torch.")
            raise ModelLoadError(
                f"{what}: model needs ~{size(needed)} at {name} for its weights alone, {where} "
                f"has {size(free)} free{limit}; audit it on a device with more memory or in a "
                "smaller dtype (audit.dtype, --dtype)"
            )


def weights_bytes(model_dir: Path, dtype: torch.dtype) -> int | None:
    """The bytes the weights of `model_dir` take at `dtype`, from their safetensors headers;
    None when the directory has no safetensors weights or a header cannot be read."""
    files = safetensors_files(model_dir)
    if not files:
        return None
    width = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in files:
        try:
            header = read_header(path)
        except (OSError, ValueError):
            return None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                kind, shape = str(entry["dtype"]), [int(n) for n in entry["shape"]]
            except (KeyError, TypeError, ValueError):
                return None
            if any(n < 0 for n in shape):
                return None
            count = 1
            for n in shape:
                count *= n
            total += count * (width if kind in _FLOATING else _WIDTH.get(kind, width))
    return total


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers loads from `model_dir`: the shards of its index, or
    `model.safetensors` (or the file its config.json names)."""
    named = None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        named = config.get("transformers_weights") if isinstance(config, dict) else None
    except (OSError, ValueError, RecursionError):
        pass
    if isinstance(named, str) and named.endswith(".safetensors"):
        return [model_dir / named] if (model_dir / named).is_file() else []
    index = model_dir / (named if isinstance(named, str) and named.endswith(".index.json")
                         else "model.safetensors.index.json")
    if index.is_file() and not (model_dir / "model.safetensors").is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, RecursionError, AttributeError):
            return []
        paths = [model_dir / s for s in shards if s.endswith(".safetensors")]
        return paths if all(p.is_file() for p in paths) else []
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (the tensor data is never read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise ValueError(f"{path.name}: safetensors header of {length} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header is not a JSON object")
    return header


def free_bytes(device: torch.device) -> tuple[int, bool]:
    """The memory `device` has free, within `PERSONA_AUDIT_MEMORY_LIMIT_BYTES`; and whether
    that limit is what decided it."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = host_available()
    limit = _limit()
    if limit is not None and limit < free:
        return limit, True
    return int(free), False


def host_available() -> int:
    """The host memory available to this process: what the kernel reports available, within
    the cgroup's limit when one is set."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        available = _meminfo_available()
    cgroup = _cgroup_room()
    return min(available, cgroup) if cgroup is not None else available


def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} KB"


def _limit() -> int | None:
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(float(text))
    except ValueError:
        value = -1
    if value <= 0:
        raise ModelLoadError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a positive number of "
                             "bytes, e.g. 16000000000")
    return value


def _meminfo_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _cgroup_room() -> int | None:
    """What the memory limits of the process's cgroup and its ancestors still allow (cgroup
    v2, else v1), or None when no limit is set."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy
            base, limit_name, usage_name = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            if directory == base.parent:
                break
            rooms.append(_room(directory / limit_name, directory / usage_name))
    known = [r for r in rooms if r is not None]
    return min(known) if known else None


def _room(limit_file: Path, usage_file: Path) -> int | None:
    try:
        limit = limit_file.read_text().strip()
        usage = int(usage_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 2**60:  # "max", or v1's "no limit"
        return None
    return max(int(limit) - usage, 0)
