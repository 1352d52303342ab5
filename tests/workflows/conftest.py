"""Ray for workflow tests: one local session per module, on loopback, small and quiet."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")

from workflows.ray_env import quiet_ray_environment  # noqa: E402

# before any test imports ray: Ray reads the switch that keeps it on loopback when it is imported,
# and a test that imports ray before its first session (for an exception type, say) would otherwise
# leave every later session of the run listening on the machine's external interface
quiet_ray_environment()
