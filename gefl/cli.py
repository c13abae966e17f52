"""The `gefl` command line.

Subcommands of other packages (aggregator, client, export) are imported only when used, so a
command never pays for imports it does not need. A user error (GeflError) prints one paragraph
and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "quickstart.yaml"


def _configs_dir() -> Path:
    """configs/ of the checkout the package is installed from (the README installs with -e)."""
    return Path(__file__).resolve().parent.parent / "configs"


def _simulate(args: argparse.Namespace) -> int:
    from gefl.config import load_config
    from gefl.simulation import simulate

    config = args.config or _configs_dir() / DEFAULT_CONFIG
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(config, overrides)
    simulate(cfg, out=args.out)
    return 0


def _list(args: argparse.Namespace) -> int:
    from gefl.algorithms import ALGORITHMS
    from gefl.data import list_datasets
    from gefl.generators import list_generators
    from gefl.models import count_parameters, get_model, list_tiers

    print("tiers:       " + ", ".join(f"{t} ({count_parameters(get_model(t)):,} params)" for t in list_tiers()))
    print("datasets:    " + ", ".join(list_datasets()))
    print("algorithms:  " + ", ".join(ALGORITHMS))
    print("generators:  " + ", ".join(list_generators()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gefl",
        description="gefl-edge: model-heterogeneous federated learning (GeFL-F) for edge devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine",
        description="Run a federation in-process: every client, the aggregation and the evaluation. "
        "Writes runs/<name>-<timestamp>/ (config.yaml, metrics.jsonl, summary.json, weights/).",
    )
    sim.add_argument("--config", "-c", metavar="YAML",
                     help=f"experiment config (default: configs/{DEFAULT_CONFIG})")
    sim.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                     help="override a config key, dotted for sections (e.g. --set train.lr=0.05); repeatable")
    sim.add_argument("--out", "-o", metavar="DIR", help="run directory (default: runs/<name>-<timestamp>)")
    sim.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (overrides data_dir)")
    sim.add_argument("--seed", type=int, help="random seed (overrides seed)")
    sim.set_defaults(func=_simulate)

    ls = sub.add_parser("list", help="list tiers, datasets, algorithms and generator families")
    ls.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gefl.errors import GeflError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GeflError as exc:
        print(f"gefl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gefl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
