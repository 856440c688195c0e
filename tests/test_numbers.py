"""Numbers as a person reads them (governance/numbers.py)."""

import math

import numpy as np
import pytest

from governance.numbers import decimals_for, fmt, fmt_interval


@pytest.mark.parametrize(("value", "uncertainty", "shown"), [
    (9.626222610473633, None, "9.63"),  # no uncertainty known: 3 significant digits
    (0.41234, None, "0.412"),
    (3.0, None, "3"),
    (1234.5, None, "1234"),  # whole numbers from 1000 on, never 1.23e+03
    (4.1234e-05, None, "4.12e-05"),
    (np.float32(0.1), None, "0.1"),
    (0.3127, 0.04, "0.31"),  # the uncertainty's first digit
    (0.3, 0.15, "0.30"),  # ... and its second when the first is 1 or 2
    (0.3, 0.3, "0.3"),  # 0.3 is 2.999...e-01 in binary: still one decimal
    (12.34, 3.0, "12"),
    (9.626222610473633, 1e-9, "9.626"),  # never more than 4 significant digits
    (0, None, "0"),
    (None, None, "n/a"),
    (math.nan, None, "n/a"),
    ("L3.H2", None, "L3.H2"),  # text as it is
    (True, None, "True"),
])
def test_fmt(value, uncertainty, shown):
    assert fmt(value, uncertainty) == shown


def test_signed_missing_and_interval():
    assert fmt(0.412, signed=True) == "+0.412" and fmt(-0.412, signed=True) == "-0.412"
    assert fmt(math.nan, missing="") == ""
    # a 10-question accuracy: its interval supports one decimal
    assert fmt_interval(0.3, 0.0, 0.6) == "0.3 [0.0, 0.6]"
    assert fmt_interval(0.3127, 0.29, 0.335) == "0.313 [0.290, 0.335]"
    assert fmt_interval(0.5, math.nan, 0.6) == "0.5 [n/a, 0.6]"  # no interval: 3 digits


@pytest.mark.parametrize(("u", "decimals"), [(0.15, 2), (0.4, 1), (0.04, 2), (3.0, 0),
                                             (0.025, 3), (250.0, 0)])
def test_decimals_for(u, decimals):
    assert decimals_for(u) == decimals
