"""Locate the data directories (config, migrations, prompts) that ship with taskorch."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the directory holding the bundled `name` data (e.g. "config", "migrations", "prompts").

    A wheel carries them under taskorch/_data/ (hatch force-include); a source checkout or editable
    install reads them straight from the repository root. The installed copy is tried first so that an
    installed server never picks up stray files from whatever directory happens to sit next to it.
    """
    packaged = _PACKAGE_DIR / "_data" / name
    if packaged.is_dir():
        return packaged
    root = _PACKAGE_DIR.parent
    # pyproject.toml marks a real checkout: in site-packages the parent is shared with other
    # distributions, one of which might ship an unrelated top-level "config" directory.
    checkout = root / name
    if checkout.is_dir() and (root / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        f"taskorch resource directory {name!r} not found: looked in {packaged} and {checkout} "
        "(is the package installed correctly?)"
    )


def migrations_dir(dialect: str) -> Path:
    """The migrations of one store dialect ("sqlite" or "postgres"): same numbers and names in each."""
    return resource_dir("migrations") / dialect
