"""Where the config groups (conf/) and recipes (recipes/) live.

In a source checkout they sit beside the package; an installed wheel carries copies under
exl2build/_resources/ (see the install rules in CMakeLists.txt). The checkout wins so an
editable install sees edits at once.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    checkout = _PACKAGE.parent
    candidates = [_PACKAGE / "_resources" / name]
    if (checkout / "pyproject.toml").is_file():  # a source checkout, not site-packages
        candidates.insert(0, checkout / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"exl2build cannot find its '{name}/' folder (looked beside the package and in "
        f"exl2build/_resources/); reinstall exl2build with `pip install .`."
    )


def conf_dir() -> Path:
    return _find("conf")


def recipes_dir() -> Path:
    return _find("recipes")
