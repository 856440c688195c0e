"""The policy's `mitigation` block on what-if curves built by hand: each way the localised
rule can come out, and that the block leaves the policy's hash (and so the audits) alone."""

import pandas as pd
import pytest
import yaml

from governance.errors import ConfigError
from governance.judge.policy import DEFAULT_POLICY_PATH, load_policy, policy_sha256
from governance.judge.policy.mitigation import LocalisedRule


def _curve(flagged_ratio, accuracy_delta, random_ratio, k=4):
    rows = [("none", None, 0, 1.0, 0.0), ("flagged", None, k, flagged_ratio, accuracy_delta)]
    rows += [("random", s, k, random_ratio, 0.0) for s in (0, 1, 2)]
    frame = pd.DataFrame(rows, columns=["selection", "seed", "k", "shift_ratio",
                                        "accuracy_delta"])
    frame["components"] = "L1.H2"
    frame["floor_shift"] = 0.02
    return frame


@pytest.mark.parametrize(("flagged", "delta", "random", "outcome", "lead"), [
    (0.4, -0.005, 0.9, "warn", "localised"),  # halves the shift, cheap, beats chance
    (0.6, -0.005, 0.9, "pass", "not localised"),  # keeps too much of the shift
    (0.4, -0.05, 0.9, "pass", "not localised"),  # costs too much accuracy
    (0.4, -0.005, 0.3, "pass", "not localised"),  # random heads do better: not the mechanism
])
def test_localised_rule(flagged, delta, random, outcome, lead):
    finding = LocalisedRule().check("mitigation.localised", _curve(flagged, delta, random))
    assert finding.outcome == outcome
    assert finding.evidence.startswith(lead + ":")
    assert finding.observed == pytest.approx(flagged) and finding.threshold == 0.5


def test_beat_random_off_and_a_k_not_measured():
    assert LocalisedRule(beat_random=False).check("r", _curve(0.4, 0.0, 0.3)).outcome == "warn"
    missing = LocalisedRule(k=8).check("r", _curve(0.4, 0.0, 0.9))
    assert missing.outcome == "warn" and "did not measure k=8" in missing.evidence


def test_the_block_loads_is_checked_and_leaves_the_hash_alone(tmp_path):
    raw = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    with_block = tmp_path / "with.yaml"
    with_block.write_text(yaml.safe_dump({**raw, "mitigation": {"localised": {"k": 2}}}))
    policy = load_policy(with_block)
    assert policy.mitigation.localised.k == 2
    assert policy_sha256(policy) == policy_sha256(load_policy(DEFAULT_POLICY_PATH))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "mitigation": {"localised": {"kk": 2}}}))
    with pytest.raises(ConfigError, match="mitigation.localised.kk"):
        load_policy(bad)
