"""What the subcommands of ``gcm`` share: argument types, the stage options (``--config``, ``--set``,
``--quiet``), a stage's settings from them, and the Ray session of ``--address``."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def at_least(kind: type[int] | type[float], minimum: int, strict: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``): a frame rate, a
    duration, a count of workers, a seed, where 0 or less would otherwise silently mean 'the
    default' or fail far from the option that caused it."""
    bound = f"{'>' if strict else '>='} {minimum}"

    def parse(text: str) -> int | float:
        value = kind(text)
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value: 'x'"
    return parse


def add_stage_options(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", type=Path, help="YAML file overriding the stage's defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one setting, dotted keys, YAML values (e.g. --set {example}); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def stage_config(cls, args: argparse.Namespace, folder_of: Callable[[Any], Path] | None = None, **explicit):
    """The stage's settings from the command line; with ``--resume``, based on those the run or
    experiment in ``folder_of(settings)`` was started with, changed only where the command says so."""
    from workflows.config import earlier_settings, resolve

    config = resolve(cls, args.config, args.overrides, **explicit)
    if folder_of is not None and config.resume:
        config = resolve(cls, args.config, args.overrides, earlier_settings(folder_of(config), cls), **explicit)
    return config


def ray_session_of(args: argparse.Namespace):
    from workflows.config import RayConfig
    from workflows.ray_env import ray_session

    return ray_session(RayConfig(address=args.address))
