"""Numbers as a person reads them: rounded to what their uncertainty supports.

    fmt(9.626222610473633)              # '9.63'   (no uncertainty known: 3 significant digits)
    fmt(0.3, uncertainty=0.15)          # '0.30'   (the uncertainty's first digit is 1 or 2:
                                        #           two of its digits, else one)
    fmt(0.3127, uncertainty=0.04)       # '0.31'
    fmt_interval(0.3, 0.0, 0.6)         # '0.3 [0.0, 0.6]'
    fmt(0.0412, signed=True)            # '+0.0412'

Everything a person reads (the terminal, the report page, version descriptions, tags meant
for people) goes through `fmt`; the CSV and JSON artifacts keep full precision.
"""

from __future__ import annotations

import math
from typing import Any

DIGITS = 3  # significant digits of a number whose uncertainty is not known
MAX_DIGITS = 4  # never more, however small the uncertainty


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def decimals_for(uncertainty: float) -> int:
    """Decimal places that an uncertainty supports: its first significant digit, or its first
    two when that digit is 1 or 2 (0.15 -> 2, 0.4 -> 1, 0.04 -> 2, 3.0 -> 0)."""
    mantissa, _, exponent = f"{uncertainty:.6e}".partition("e")  # exact leading digit
    leading, exponent = int(mantissa[0]), int(exponent)
    return max(0, -exponent + (1 if leading < 3 else 0))


def fmt(value: Any, uncertainty: Any = None, *, signed: bool = False,
        missing: str = "n/a") -> str:
    """`value` rounded to what `uncertainty` supports (a standard error or an interval's
    half-width), else to `DIGITS` significant digits (whole numbers from 1000 on), at most
    `MAX_DIGITS` either way. `missing` for None and NaN; text and booleans as they are."""
    if value is None or _is_nan(value):
        return missing
    v = _finite(value)
    if v is None or isinstance(value, bool):
        return str(value)
    sign = "+" if signed else ""
    u = _finite(uncertainty)
    if u is not None and u > 0:
        magnitude = math.floor(math.log10(abs(v))) if v else 0
        cap = max(0, MAX_DIGITS - 1 - magnitude)  # the decimals of MAX_DIGITS digits
        return f"{v:{sign}.{min(decimals_for(u), cap)}f}"
    if abs(v) >= 10 ** DIGITS:
        return f"{v:{sign}.0f}"
    return f"{v:{sign}.{DIGITS}g}"


def fmt_interval(value: Any, low: Any, high: Any, *, signed: bool = False) -> str:
    """'value [low, high]', all three rounded to what the interval's half-width supports."""
    lo, hi = _finite(low), _finite(high)
    half = (hi - lo) / 2 if lo is not None and hi is not None and hi > lo else None
    return (f"{fmt(value, half, signed=signed)} [{fmt(low, half, signed=signed)}, "
            f"{fmt(high, half, signed=signed)}]")


def _is_nan(value: Any) -> bool:
    try:
        return bool(value != value)
    except (TypeError, ValueError):  # pd.NA
        return True
