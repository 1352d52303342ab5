"""The ``gcm`` command: parses arguments and calls the stages; no logic of its own lives here."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from workflows import commands

DESCRIPTION = """\
gcm-tal: temporal action localization with the Graph Convolutional Module (GCM).

A typical session (each stage writes its outputs and resolved config.yaml into its --out folder):
  gcm synth --out data/synth --scale small            a synthetic THUMOS'14-like dataset
  gcm preprocess --card data/synth/card.yaml --data-root data/synth --out runs/prep
  gcm train --data runs/prep --out runs --name ssn-gcm          (--set model.act_module=mlp ...)
  gcm evaluate --checkpoint runs/ssn-gcm/model.pt --data runs/prep --out runs/eval
  gcm tune table9_edges --data runs/prep --out runs/tune        the paper's ablation grids
  gcm report runs/ssn-gcm runs/eval                              tables and figures
  gcm demo                                                       all of the above, small
Other tools: eval-detections (score a result file), detect (new videos: one, or a folder of them).
Add --address auto (before the command) to run on a Ray cluster (see ray_cluster.yaml).
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one and its help does not already say it (no
    "(default: None)" after required options, flags and repeatable options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = action.default is None or action.default is False or action.default == []
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use: 'auto' (the cluster this node belongs to), HOST:PORT (its head "
                             "node) or ray://HOST:PORT (Ray Client) (default: an embedded local Ray)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in commands.REGISTRY.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        add_arguments(p)
    return parser


def _message(err: BaseException) -> str:
    """What went wrong, in the user's terms: a Ray task's own exception rather than Ray's wrapper
    around it with the remote traceback (which --debug shows), and of a Ray Train run failed in
    its workers, the first worker's (a one-stage run reads its features there: a file's error
    names the file)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
    while isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = commands.REGISTRY[args.command][2]
    try:
        return run(args)
    except KeyboardInterrupt:
        print("gcm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output closed it (`gcm ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # one clear paragraph unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"gcm {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
