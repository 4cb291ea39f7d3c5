"""Numeric answers in pair files: :func:`parse_answer`, the one rule for what counts as a number.

Contract (docs/method.md §9.2): an answer is a JSON number or a numeric string; integral values
become ``int`` and others ``float``, so ``"18"``, ``"18.0"`` and ``18`` are all the int ``18``;
commas are accepted only as proper thousands separators. Everything else (null, booleans, text,
underscores, NaN or infinity) raises ``ValueError``, which the pair reader reports as a problem
of the file.
"""

from __future__ import annotations

import math
import re
from typing import Any

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def parse_answer(value: Any) -> int | float:
    """A numeric answer from a JSON number or a numeric string ("1,234", "18.0", "-3") (§9.2).

    Integral values become ``int`` (``"18.0"`` -> ``18``), others ``float``. Raises ``ValueError``
    for anything else (``None``, booleans, text, NaN/infinity).

    >>> parse_answer("1,234"), parse_answer("18.0"), parse_answer(2.5)
    (1234, 18, 2.5)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if "," in text:
            if not _THOUSANDS.match(text):
                raise ValueError(f"{value!r} is not a number")
            text = text.replace(",", "")
        if "_" in text:
            raise ValueError(f"{value!r} is not a number")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    else:
        raise ValueError(f"{value!r} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return int(number) if number.is_integer() else number
