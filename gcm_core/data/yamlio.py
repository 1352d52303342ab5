"""YAML as gcm-tal reads it: PyYAML's safe loader, with YAML 1.2's reading of exponent floats.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: ``1e-3``, ``2E5`` and
``1.0e3`` are strings there, so ``lr: 1e-3`` in a config file, or ``--set train.lr=1e-3``, gave a
learning rate of ``'1e-3'``. Every YAML that gcm-tal reads (configs, ``--set`` values, grids,
dataset cards) goes through :func:`loads` or :func:`read_yaml`, which read such numbers as YAML 1.2
and every other YAML reader (ruamel, yq, Go, JavaScript) do. YAML 1.1's floats and everything else
are unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's exponent floats (digits, an optional fraction, ``e`` or
    ``E`` and a possibly unsigned exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def loads(text: str) -> Any:
    """The YAML document ``text`` (a ``--set`` value, a file's contents)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; where it is not YAML, a one-line ValueError naming the file,
    the line and the problem (PyYAML's own message spans several lines)."""
    try:
        return loads(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
