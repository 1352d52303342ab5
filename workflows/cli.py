"""The ``gcm`` command: parses arguments and calls the stages; no logic of its own lives here."""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from workflows import commands

DESCRIPTION = """\
gcm-tal: temporal action localization with the Graph Convolutional Module (GCM).

Typical session:
  gcm eval-detections --protocol thumos14 --ground-truth GT --detections DETS   score a result file
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in commands.REGISTRY.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = commands.REGISTRY[args.command][2]
    try:
        return run(args)
    except KeyboardInterrupt:
        print("gcm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear paragraph unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"gcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
