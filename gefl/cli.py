"""The `gefl` command line.

Subcommands of other packages (aggregator, client, export) are imported only when used, so a
command never pays for imports it does not need. A user error (GeflError) prints one paragraph
and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gefl.errors import GeflError, unknown_name

DEFAULT_CONFIG = "quickstart.yaml"
_TRAIN_MODULES = {"torch", "torchvision", "safetensors", "yaml", "onnx", "onnxscript", "psutil"}
"""Modules of the `train` extra: a board with only `infer` installed gets told what to install."""


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
    if args.devices:
        overrides.append(f"devices={args.devices}")
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


def _probe(args: argparse.Namespace) -> int:
    import json

    from edge_client.probe import format_profile, probe
    from gefl.devices import DEVICES_PATH, Policy, load_catalogue, load_profiles, select_tier

    _, defaults = load_profiles(DEVICES_PATH)
    policy = Policy(
        deadline_s=args.deadline if args.deadline is not None else defaults.deadline_s,
        samples_per_round=args.samples_per_round if args.samples_per_round is not None else defaults.samples_per_round,
        memory_fraction=args.memory_fraction if args.memory_fraction is not None else defaults.memory_fraction,
    )
    catalogue = load_catalogue()
    profile = probe(args.root, measure=True)  # after the flags are checked: measuring takes a second
    if args.tier:
        from gefl.models import list_tiers

        if args.tier not in list_tiers():
            raise unknown_name("tier", args.tier, list_tiers())
        tier, reason = args.tier, f"{args.tier}: chosen with --tier (the policy was not consulted)"
    else:
        candidates = args.tiers.split(",") if args.tiers else list(catalogue.tiers)
        choice = select_tier(candidates, profile.memory_available_bytes / 2**20, profile.train_samples_per_s,
                             policy, catalogue)
        tier, reason = choice.tier, choice.reason
    if args.json:
        print(json.dumps({**profile.to_dict(), "tier": tier, "reason": reason}, indent=2))
    else:
        print(format_profile(profile))
        print(f"tier      {reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_run

    tiers = None if args.tiers in (None, "all") else [t.strip() for t in args.tiers.split(",") if t.strip()]
    export_run(args.run_dir, args.out, tiers=tiers, quantize_mode=args.quantize, data_dir=args.data_dir)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from export.infer import run

    if args.top < 1:
        raise GeflError(f"--top must be at least 1, got {args.top}")
    if args.threads is not None and args.threads < 1:
        raise GeflError(f"--threads must be at least 1, got {args.threads}")
    run(args.model, args.target, top=args.top, threads=args.threads)
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
    sim.add_argument("--devices", metavar="YAML",
                     help="simulate a device mix (e.g. configs/devices.yaml): each client picks its tier by the "
                     "device policy and a simulated clock drives deadlines and stragglers")
    sim.set_defaults(func=_simulate)

    prb = sub.add_parser(
        "probe",
        help="describe this device and the tier it would train",
        description="Measure this device (CPU, memory, board, CUDA, a one-second training run) and pick its "
        "tier: the largest whose training fits in a fraction of the available memory and whose estimated round "
        "time meets the deadline (defaults from configs/devices.yaml, costs from configs/tiers.yaml).",
    )
    prb.add_argument("--json", action="store_true", help="print one JSON object (configs/schemas/probe.schema.json)")
    prb.add_argument("--tier", metavar="NAME", help="skip the policy and report this tier")
    prb.add_argument("--tiers", metavar="A,B,...",
                     help="tiers the federation offers (default: every tier in the catalogue)")
    prb.add_argument("--deadline", type=float, metavar="S", help="round deadline in seconds (default 20)")
    prb.add_argument("--samples-per-round", type=int, metavar="N",
                     help="local samples x local epochs per round (default 3000)")
    prb.add_argument("--memory-fraction", type=float, metavar="F",
                     help="share of available memory training may use (default 0.5)")
    prb.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake device tree, for tests
    prb.set_defaults(func=_probe)

    exp = sub.add_parser(
        "export",
        help="export a run's tiers to ONNX (verified, optionally int8)",
        description="Export each tier of a run (FE + head) as ONNX with a dynamic batch axis and the metadata "
        "`gefl infer` needs; check it against PyTorch on 256 test images; quantize to int8; measure every file's "
        "accuracy on the whole test set. Writes DIR/<tier>.onnx, DIR/<tier>.int8.onnx and DIR/export_report.json.",
    )
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `gefl simulate`")
    exp.add_argument("--out", "-o", required=True, metavar="DIR", help="where the .onnx files and the report go")
    exp.add_argument("--tiers", default="all", metavar="all|NAME,...", help="tiers to export (default: all)")
    exp.add_argument("--quantize", default="static", choices=["none", "dynamic", "static"],
                     help="int8 version beside each fp32 file: static QDQ calibrated on 256 training images "
                     "(default), dynamic (linear layers only), or none")
    exp.add_argument("--data-dir", metavar="DIR", help="where the run's dataset is (default: the run's data_dir)")
    exp.set_defaults(func=_export)

    inf = sub.add_parser(
        "infer",
        help="classify images with an exported model (onnxruntime only, no torch)",
        description="Classify an image, or every image in a directory, with a model written by `gefl export`. "
        "Needs only onnxruntime, numpy and pillow (pip install 'gefl-edge[infer]').",
    )
    inf.add_argument("model", metavar="MODEL.onnx", help="a file written by `gefl export`")
    inf.add_argument("target", metavar="IMAGE|DIR", help="an image file, or a directory of images")
    inf.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely classes (default 1)")
    inf.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: all cores)")
    inf.set_defaults(func=_infer)

    ls = sub.add_parser("list", help="list tiers, datasets, algorithms and generator families")
    ls.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GeflError as exc:
        print(f"gefl: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _TRAIN_MODULES:
            print(f"gefl: error: `gefl {args.command}` needs {exc.name}, which is not installed; install the "
                  "training dependencies with: pip install 'gefl-edge[train]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("gefl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
