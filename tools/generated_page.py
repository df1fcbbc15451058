"""Write a generated docs page, or (``--check``) say that it is stale: what every docs generator here shares.

Why: the docs' generated parts (code map, benchmark page) are checked by tests the same way; one helper
keeps the message and the exit codes the same for each.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, new: str, check: bool, tool: str) -> int:
    """With ``check``: 0 when ``path`` already holds ``new``, else 1 with a message naming ``tool``.
    Without: write ``new`` to ``path`` and return 0."""
    if check:
        if not path.is_file() or path.read_text() != new:
            print(f"{path.name} is stale: run python tools/{tool}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"updated {path}")
    return 0
