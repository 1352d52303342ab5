"""What produced an output: the package version and, in a git checkout, the commit."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path


@lru_cache(maxsize=1)
def code_version() -> str:
    """``gcm-tal <version>`` plus ``@<commit>`` (``+dirty`` with uncommitted changes) when known."""
    try:
        version = metadata.version("gcm-tal")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"gcm-tal {version}"
    return f"gcm-tal {version}@{commit}{'+dirty' if dirty else ''}"
