"""The mined exercise set: helpers carried into prompts, third-party context refused, a split that is stable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nanophi.textbook.experiment.data import Exercise, verify_exercises
from nanophi.textbook.experiment.exercises import doctest_exercises, split

MODULE = '''import math
import numpy as np


def _square(x):
    return x * x


def hyp(a, b):
    """Hypotenuse.

    >>> hyp(3, 4)
    5.0
    """
    s = _square(a) + _square(b)
    return math.sqrt(s)


def norm(v):
    """Length of a vector.

    >>> norm([3, 4])
    5.0
    """
    v = np.asarray(v)
    return float(np.sqrt((v * v).sum()))


def uses_pkg(x):
    """Needs the package itself in its examples.

    >>> import numpy; uses_pkg(1)
    1
    """
    y = x
    return y
'''


def test_package_doctests_carry_helpers_and_refuse_third_party_context(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(MODULE)
    counts: Counter[str] = Counter()
    found = doctest_exercises(tmp_path, "doctest:pkg", stdlib_only=True, counts=counts)
    assert [e.name for e in found] == ["hyp"]
    assert counts["needs_module_context"] == 1 and counts["examples_import_packages"] == 1
    [ex] = found
    assert ex.source == "doctest:pkg" and "def _square(x)" in ex.prompt and "numpy" not in ex.prompt
    assert verify_exercises(found) == [True]  # in the sandbox, which has no site-packages


def test_split_is_a_hash_of_the_id_alone() -> None:
    exs = [Exercise(f"id{i}", f"f{i}", "p", "s", "t") for i in range(30)]
    train, held = split(exs, heldout=10)
    assert len(held) == 10 and not {e.id for e in train} & {e.id for e in held}
    train2, held2 = split(list(reversed(exs)) + [Exercise("new", "g", "p", "s", "t")], heldout=10)
    # a new exercise can take a held-out place, but never moves an old one from train into held-out
    assert {e.id for e in held2} - {"new"} <= {e.id for e in held}
    assert split(exs, heldout=10, seed=1)[1] != held
