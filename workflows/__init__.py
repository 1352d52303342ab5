"""gcm-tal's Ray workflows (preprocess, train, tune, evaluate, report) and the ``gcm`` command."""
from pathlib import Path

#: The paper's ablation grids shipped with gcm-tal (``gcm tune <name>``).
GRID_DIR = Path(__file__).resolve().parent / "grids"
