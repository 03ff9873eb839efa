"""``python -m llm_gateway.simulator [options]``: the same command as ``llm-gateway simulate``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cli import main as _cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llm-gateway simulate`` with ``argv`` (default: the process arguments)."""
    return _cli_main(["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
