"""Whole counts from a written fraction times a count, computed exactly.

A float setting is taken as the decimal it was written as (its shortest repr, which
round-trips to the same float), not as its binary value: 0.35 is 0.34999999999999997... in
binary, so the float product 0.35 * 90 = 31.499999999999996 rounds to 31 where 31.5 rounds
(half up) to 32; 1.1 * 100 = 110.00000000000001 makes ``ceil`` give 111; 0.29 * 100 = 28.999...
truncates to 28. Every count derived from a fraction or a number of epochs (optimiser steps,
kept images, discarded attention entries, pruned units) goes through ``scaled``.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Callable

Rounding = Callable[[Fraction], int]


def as_fraction(x: float | numbers.Rational) -> Fraction:
    """``x`` as an exact fraction: integers and fractions as they are, a float as its decimal repr."""
    if isinstance(x, numbers.Rational):
        return Fraction(x)
    # float() first: repr of a numpy float64 is "np.float64(0.35)" under numpy 2
    return Fraction(repr(float(x)))


def half_up(q: Fraction) -> int:
    """Nearest integer to ``q``, halves upwards (``round`` sends halves to even)."""
    return math.floor(q + Fraction(1, 2))


def scaled(x: float | numbers.Rational, n: int, rounding: Rounding) -> int:
    """``rounding(x * n)`` on the exact product (e.g. ``math.ceil``, ``math.floor``, ``round``, ``half_up``)."""
    return int(rounding(as_fraction(x) * int(n)))
