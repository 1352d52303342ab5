"""Helpers shared by test modules (importable as ``helpers``: tests/ is on the path)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GCM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def read_tag_proposals_frames(path: Path, n_videos: int) -> dict[str, list[tuple[int, int]]]:
    """A deliberately plain reader of the first videos of an SSN/P-GCN proposal list (frames)."""
    lines = path.read_text().splitlines()
    out: dict[str, list[tuple[int, int]]] = {}
    i = 0
    while i < len(lines) and len(out) < n_videos:
        assert lines[i].startswith("#"), lines[i]
        video = lines[i + 1].rstrip("/").split("/")[-1]
        n_gt = int(lines[i + 4])
        i += 5 + n_gt
        n_prop = int(lines[i])
        rows = [line.split() for line in lines[i + 1:i + 1 + n_prop]]
        out[video] = [(int(r[3]), int(r[4])) for r in rows]
        i += 1 + n_prop
    return out
