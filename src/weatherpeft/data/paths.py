"""How a relative path on the command line or in a config resolves: one rule for all.

A relative path (a backbone folder such as the default ``models/aurora-tiny``, a data store, a
reference store) is looked up in the working folder first, then in the weatherpeft checkout
(the folder holding ``src/weatherpeft``), so the defaults work from any folder of a checkout
and a user's own files win. Absolute paths are taken as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKOUT", "resolve_path"]

#: The checkout this package runs from (``src/weatherpeft/data/paths.py`` → three levels up).
CHECKOUT = Path(__file__).resolve().parents[3]


def resolve_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as found: itself if absolute or present from the working folder, else in the
    checkout; FileNotFoundError naming ``what`` and both places tried."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        if not given.exists():
            raise FileNotFoundError(f"{what} not found: {given}")
        return given
    in_checkout = CHECKOUT / given
    if in_checkout.exists():
        return in_checkout
    raise FileNotFoundError(f"{what} not found: {given} is neither in the working folder "
                            f"({Path.cwd() / given}) nor in the weatherpeft checkout ({in_checkout})")
