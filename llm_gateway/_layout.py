"""Import-time check that ``usage`` is this distribution's package, not a user's module.

The distribution installs two top-level packages, ``llm_gateway`` and ``usage``. A file or
folder named ``usage`` earlier on ``sys.path`` (the script's own directory comes first) shadows
the second one; this turns the resulting obscure ``ImportError`` into one naming the cause.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def _same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_usage_package() -> None:
    """Raise ``ImportError`` naming the shadowing file if ``import usage`` finds another one."""
    expected = Path(__file__).resolve().parent.parent / "usage" / "__init__.py"
    # find_spec locates the module without executing it (or returns the imported one's spec).
    spec = importlib.util.find_spec("usage")
    found = spec.origin if spec is not None else None
    if found is None or _same_file(found, str(expected)):
        # Not found at all, or a namespace/frozen layout: let the normal import report it.
        return
    shadow = Path(found)
    if shadow.name == "__init__.py":
        shadow = shadow.parent
    raise ImportError(
        f"llm_gateway needs its own top-level 'usage' package ({expected.parent}), but"
        f" {shadow} shadows it (a module named 'usage' earlier on sys.path, usually beside"
        f" your script or in the current directory): rename {shadow.name} (e.g. to"
        f" my_{shadow.name})."
    )


check_usage_package()
