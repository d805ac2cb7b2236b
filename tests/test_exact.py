"""Exact whole counts from a written fraction times a count, against decimal arithmetic."""
from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from fractions import Fraction

import numpy as np

from vitsam.exact import as_fraction, half_up, scaled

RULES = [(half_up, ROUND_HALF_UP), (round, ROUND_HALF_EVEN), (math.floor, ROUND_FLOOR),
         (math.ceil, ROUND_CEILING)]


def test_scaled_equals_decimal_arithmetic_for_two_decimal_fractions():
    for n in (7, 90, 100, 390):
        for i in range(1, 200):
            f = i / 100
            for rule, mode in RULES:
                want = int((Decimal(str(f)) * n).to_integral_value(mode))
                assert scaled(f, n, rule) == want, (f, n, rule)


def test_as_fraction_takes_numbers_as_written():
    assert as_fraction(0.35) == Fraction(35, 100)
    assert as_fraction(np.float64(0.29)) == Fraction(29, 100)  # repr is "np.float64(0.29)"
    assert as_fraction(np.float32(0.5)) == Fraction(1, 2)
    assert as_fraction(3) == 3 and as_fraction(np.int64(3)) == 3
    assert as_fraction(Fraction(1, 3)) == Fraction(1, 3)
    assert (half_up(Fraction(5, 2)), half_up(Fraction(-5, 2)), round(Fraction(5, 2))) == (3, -2, 2)
