"""What counts as an integer or a number in an option a caller passes: Python's and numpy's (``np.int64(4)`` from
an array, say), never a bool, which Python counts as an int but which is never meant as a count, a size or an index.
"""

from __future__ import annotations

import numbers


def is_integer(value: object) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int, a float or a numpy one of them, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
