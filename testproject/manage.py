#!/usr/bin/env python
"""Django's command-line utility for testproject; works from any directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    """Run a management command with the repository root importable."""
    here = Path(__file__).resolve().parent
    # Import ``testproject`` as a package from the repository root, never its modules
    # (settings, urls, ...) as top-level ones from this directory.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    root = str(here.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
