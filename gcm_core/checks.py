"""Range checks of configuration values.

A setting out of its range (a negative learning rate, a dropout of 1, no workers) is refused
where the configuration is built, i.e. where a YAML file or a ``--set`` is read, naming the field,
rather than deep inside a training worker minutes later (torch's own checks) or never (a dropout
of 1, an NMS threshold of 2, which run and give nonsense).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

RULES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(config: object, **rules: str) -> None:
    """Raise ValueError naming each field of ``config`` outside its rule (a key of :data:`RULES`).

    A field holding a sequence is checked element by element, a mapping value by value; ``None``
    passes (wherever a field allows it, it means "not set": no gradient clipping, full
    neighbourhoods)."""
    bad = []
    for name, rule in rules.items():
        value = getattr(config, name)
        values: Iterable = value.values() if isinstance(value, dict) else \
            value if isinstance(value, (tuple, list)) else [value]
        if any(v is not None and not RULES[rule](v) for v in values):
            bad.append(f"{name} must be {rule}, got {value!r}")
    if bad:
        raise ValueError("; ".join(bad))
