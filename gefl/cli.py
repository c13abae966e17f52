"""The `gefl` command line.

Subcommands of other packages (aggregator, client, export) are imported only when used, so a
command never pays for imports it does not need. A user error (GeflError) prints one paragraph
and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gefl import logs
from gefl.errors import GeflError, unknown_name

DEFAULT_CONFIG = "quickstart.yaml"
_TRAIN_MODULES = {"torch", "torchvision", "safetensors", "yaml", "onnx", "onnxscript", "psutil", "cryptography"}
"""Modules of the `train` extra: a board with only `infer` installed gets told what to install."""


def _load(args: argparse.Namespace, extra: list[str] | None = None):  # -> Config, typed lazily
    from gefl.config import load_config
    from gefl.resources import resolve

    config = resolve(args.config or DEFAULT_CONFIG, "config")
    overrides = list(args.set or []) + list(extra or [])
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "tensorboard", None):
        overrides.append(f"tensorboard={args.tensorboard}")
    return load_config(config, overrides)


def _simulate(args: argparse.Namespace) -> int:
    if args.resume:
        from gefl.simulation import simulate

        if args.transport != "inprocess":
            raise GeflError("--resume continues an in-process run; a networked run resumes through its aggregator's "
                            "--state-dir (gefl aggregator serve)")
        given = args.config or args.set or args.data_dir or args.seed is not None or args.devices or args.tensorboard
        # Given no config, the run's own config.yaml; given one, any key that differs from it is refused.
        cfg = _load(args, [f"devices={args.devices}"] if args.devices else []) if given else None
        _report_at_end(simulate(cfg, out=args.out, resume=args.resume)["run_dir"])
        return 0
    cfg = _load(args, [f"devices={args.devices}"] if args.devices else [])
    if args.broker and args.transport != "mqtt":
        raise GeflError("--broker is for --transport mqtt")
    if args.transport in ("grpc", "mqtt"):
        from gefl.aggregator.local_federation import simulate_over_network

        summary = simulate_over_network(cfg, args.transport, broker=args.broker, out=args.out)
    else:
        from gefl.simulation import simulate

        summary = simulate(cfg, out=args.out)
    _report_at_end(summary["run_dir"])
    return 0


def _report_at_end(run_dir: str) -> None:
    """A finished run's report (gefl report RUN_DIR), written by the command that ran it; a report that
    cannot be drawn (no matplotlib) is a warning, never a failed run."""
    import logging

    try:
        from gefl.report import write_report

        write_report(run_dir)
    except (GeflError, ImportError) as exc:
        logging.getLogger(__name__).warning(f"no report for {run_dir}: {exc}")


def _tls_files(cert: str | None, key: str | None, client_ca: str | None):  # -> TlsFiles | None
    from gefl.aggregator.grpc_server import TlsFiles

    if (cert is None) != (key is None):
        raise GeflError("--tls-cert and --tls-key go together (the server certificate and its private key)")
    if client_ca and cert is None:
        raise GeflError("--client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
    return TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None) if cert else None


def _read_token_file(path: str) -> str:
    """The token in `path`, stripped of surrounding whitespace (the newline an editor or `echo` adds).

    Tokens travel in files or the environment, never on the command line, where `ps` shows them to
    every user of the machine. A missing, empty or multi-word file is refused: each is a mistake
    (a wrong path, a file not yet filled, the env file given instead of the token file) that would
    otherwise surface as an "enrolment token refused" from the aggregator, far from its cause.
    """
    import logging
    import stat

    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GeflError(f"the token file {path} does not exist (--token-file names a file holding the "
                        "enrolment token; the aggregator keeps its own in STATE_DIR/enrolment-token)") from None
    except IsADirectoryError:
        raise GeflError(f"the token file {path} is a directory; --token-file names the file holding the token") \
            from None
    except OSError as exc:
        raise GeflError(f"cannot read the token file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise GeflError(f"the token file {path} is not text: it should hold the enrolment token alone") from None
    token = text.strip()
    if not token:
        raise GeflError(f"the token file {path} is empty: write the enrolment token into it (the aggregator "
                        "keeps it in STATE_DIR/enrolment-token)")
    if len(token.split()) > 1:
        raise GeflError(f"the token file {path} holds more than one word: it should hold the enrolment token "
                        "alone (a token has no spaces)")
    if mode & stat.S_IROTH:
        # A warning, not a refusal: a group-readable file (0640, group of the service's user) is a
        # sound set-up, and a world-readable one may be a deliberate test machine; but say it.
        logging.getLogger(__name__).warning("the token file %s is readable by every user of this machine: chmod 600 "
                                            "%s (or 640 with the group of the user that runs gefl)", path, path)
    return token


def _token(args: argparse.Namespace) -> str | None:
    """--token-file, else $GEFL_TOKEN, else None."""
    import os

    if args.token_flag is not None:
        raise GeflError("--token is gone: a token on the command line is shown by `ps` to every user of the "
                        "machine. Set GEFL_TOKEN or pass --token-file FILE (a file holding the token) instead")
    if args.token_file:
        return _read_token_file(args.token_file)
    return os.environ.get("GEFL_TOKEN") or None


def _aggregator_serve(args: argparse.Namespace) -> int:
    from gefl.aggregator.serve import MqttEndpoint, serve
    from gefl.protocol.mqtt import parse_broker_url

    cfg = _load(args)
    tls = _tls_files(args.tls_cert, args.tls_key, args.client_ca)
    mqtt = None
    if args.mqtt:
        mqtt = MqttEndpoint(parse_broker_url(args.mqtt), _mqtt_auth(args.mqtt_user, args.mqtt_ca, args.mqtt_cert,
                                                                    args.mqtt_key))
    elif args.mqtt_user or args.mqtt_ca or args.mqtt_cert:
        raise GeflError("--mqtt-user, --mqtt-ca and --mqtt-cert need --mqtt URL (the broker to serve through)")
    listen = args.listen or (None if mqtt else "0.0.0.0:50051")
    serve(cfg, args.state_dir, listen=listen, tls=tls, mqtt=mqtt, token=_token(args), insecure=args.insecure,
          status=args.status, status_token=_status_token(args) if args.status else None)
    _report_at_end(args.state_dir)
    return 0


def _status_token(args: argparse.Namespace) -> str | None:
    """--status-token-file, else $GEFL_STATUS_TOKEN, else None (loopback only)."""
    import os

    from gefl.aggregator.status import STATUS_TOKEN_ENV

    if args.status_token_file:
        return _read_token_file(args.status_token_file)
    return os.environ.get(STATUS_TOKEN_ENV) or None


def _aggregator_status(args: argparse.Namespace) -> int:
    import json

    from gefl.aggregator.status import fetch_status, format_status

    status = fetch_status(args.url, _status_token(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _mqtt_auth(user: str | None, ca: str | None, cert: str | None, key: str | None):  # -> MqttAuth
    import os

    from gefl.protocol.mqtt import MqttAuth

    if (cert is None) != (key is None):
        raise GeflError("the MQTT client certificate and its key go together")
    password = os.environ.get("GEFL_MQTT_PASSWORD")
    if password and not user:
        raise GeflError("GEFL_MQTT_PASSWORD is set but no MQTT username was given (--mqtt-user)")
    return MqttAuth(user, password, Path(ca) if ca else None, Path(cert) if cert else None,
                    Path(key) if key else None)


def _client_run(args: argparse.Namespace) -> int:
    from gefl.edge_client.connect import open_transport
    from gefl.edge_client.runtime import ClientOptions, ClientRuntime

    token = _token(args)
    if not token:
        raise GeflError("the aggregator's enrolment token is needed: set GEFL_TOKEN or pass --token-file FILE "
                        "(the aggregator keeps it in STATE_DIR/enrolment-token)")
    if args.threads is not None and args.threads < 1:
        raise GeflError(f"--threads must be at least 1, got {args.threads}")
    auth = _mqtt_auth(args.mqtt_user, args.ca, args.cert, args.key)
    transport = open_transport(args.aggregator, token, ca=args.ca, cert=args.cert, key=args.key,
                               mqtt_user=auth.username, mqtt_password=auth.password, insecure=args.insecure)
    options = ClientOptions(Path(args.data_dir), tier=args.tier, name=args.name or args.mqtt_user, threads=args.threads,
                            give_up_s=args.give_up, state_dir=Path(args.state_dir) if args.state_dir else None,
                            share_label_histogram=args.share_label_histogram)
    ClientRuntime(transport, options).run()
    return 0


SHIPPED_GEFL = "/opt/gefl/venv/bin/gefl"
"""The gefl executable the shipped systemd unit runs (configs/systemd/gefl-client.service)."""


def _client_service(args: argparse.Namespace) -> int:
    from gefl.resources import packaged

    if args.env:
        print(packaged("systemd/client.env").read_text(), end="")
        return 0
    unit = packaged("systemd/gefl-client.service").read_text()
    if args.gefl_path:
        gefl = Path(args.gefl_path)
        if not gefl.is_absolute():
            # systemd runs ExecStart= with no working directory or PATH of the user's.
            raise GeflError(f"--gefl-path must be an absolute path (systemd needs one), got {args.gefl_path!r}; "
                            "e.g. --gefl-path \"$(command -v gefl)\"")
        if any(c.isspace() for c in str(gefl)):
            raise GeflError(f"--gefl-path {args.gefl_path!r} has a space, which ExecStart= would split: install "
                            "gefl in a directory without spaces")
        unit = unit.replace(f"\nExecStart={SHIPPED_GEFL} ", f"\nExecStart={gefl} ")  # the comments keep theirs
    print(unit, end="")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from gefl.aggregator.certs import DEFAULT_DAYS, describe, issue

    result = issue(args.out, server_names=args.server_name, server_ips=args.server_ip, clients=args.client or (),
                   days=DEFAULT_DAYS if args.days is None else args.days)
    print(describe(result))
    return 0


def _list(args: argparse.Namespace) -> int:
    from gefl.algorithms import ALGORITHMS
    from gefl.data import list_datasets
    from gefl.generators import list_generators
    from gefl.tiers.models import count_parameters, get_model, list_tiers

    print("tiers:       " + ", ".join(f"{t} ({count_parameters(get_model(t)):,} params)" for t in list_tiers()))
    print("datasets:    " + ", ".join(list_datasets()))
    print("algorithms:  " + ", ".join(ALGORITHMS))
    print("generators:  images (gefl): " + ", ".join(list_generators("image"))
          + "; FE features (gefl-f): " + ", ".join(list_generators("feature")))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import json

    from gefl.edge_client.probe import format_profile, probe
    from gefl.tiers.devices import DEVICES_PATH, DeviceProfile, Policy, load_catalogue, load_profiles, select_tier

    _, defaults = load_profiles(DEVICES_PATH)
    policy = Policy(
        deadline_s=args.deadline if args.deadline is not None else defaults.deadline_s,
        samples_per_round=args.samples_per_round if args.samples_per_round is not None else defaults.samples_per_round,
        memory_fraction=args.memory_fraction if args.memory_fraction is not None else defaults.memory_fraction,
    )
    catalogue = load_catalogue()
    profile = probe(args.root, measure=True)  # after the flags are checked: measuring takes a second
    if args.tier:
        from gefl.tiers.models import list_tiers

        if args.tier not in list_tiers():
            raise unknown_name("tier", args.tier, list_tiers())
        tier, reason = args.tier, f"{args.tier}: chosen with --tier (the policy was not consulted)"
    else:
        # The opt-in tiers (torchvision backbones) only when asked for, as a federation offers them.
        candidates = args.tiers.split(",") if args.tiers else [t for t, c in catalogue.tiers.items() if not c.opt_in]
        # profile.cuda: the GPU this device's torch trains on (None: none, so a CPU-only build's memory figures).
        device = DeviceProfile.from_probe(profile.to_dict(), profile.board or "this device")
        choice = select_tier(candidates, device.memory_available_mb, device.train_samples_per_s, policy, catalogue,
                             cuda=device.cuda)
        tier, reason = choice.tier, choice.reason
    if args.json:
        print(json.dumps({**profile.to_dict(), "tier": tier, "reason": reason}, indent=2))
    else:
        print(format_profile(profile))
        print(f"tier      {reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gefl.export.onnx_export import export_run

    tiers = None if args.tiers in (None, "all") else [t.strip() for t in args.tiers.split(",") if t.strip()]
    export_run(args.run_dir, args.out, tiers=tiers, quantize_mode=args.quantize, data_dir=args.data_dir)
    return 0


def _samples(args: argparse.Namespace) -> int:
    from gefl.samples import render_samples

    if args.per_class < 1:
        raise GeflError(f"--per-class must be at least 1, got {args.per_class}")
    print(f"wrote {render_samples(args.run_dir, args.out, args.per_class, args.seed, args.data_dir)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from gefl.report import write_comparison, write_report

    if len(args.run_dirs) > 1:
        if not args.out:
            raise GeflError(f"comparing {len(args.run_dirs)} runs needs --out DIR (the report belongs to none of "
                            "them); e.g. gefl report RUN_A RUN_B --out compare/")
        write_comparison(args.run_dirs, args.out)
    else:
        write_report(args.run_dirs[0], args.out)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from gefl.export.infer import run

    if args.top < 1:
        raise GeflError(f"--top must be at least 1, got {args.top}")
    if args.threads is not None and args.threads < 1:
        raise GeflError(f"--threads must be at least 1, got {args.threads}")
    run(args.model, args.target, top=args.top, threads=args.threads)
    return 0


def _data_split(args: argparse.Namespace) -> int:
    from gefl.image_folder import write_split

    spc = args.samples_per_client.strip().lower()
    if spc == "all":
        samples_per_client = None
    elif spc.isdigit() and int(spc) >= 1:
        samples_per_client = int(spc)
    else:
        raise GeflError(f"--samples-per-client must be a positive whole number or 'all', "
                        f"got {args.samples_per_client!r}")
    write_split(args.dataset, args.clients, Path(args.out), kind=args.partition, samples_per_client=samples_per_client,
                alpha=args.alpha, shards_per_client=args.shards_per_client, seed=args.seed, data_dir=args.data_dir)
    return 0


def _log_options() -> argparse.ArgumentParser:
    """--quiet, --verbose and --log-format, on every command (after its name: gefl simulate -q)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("logging")
    level = group.add_mutually_exclusive_group()
    level.add_argument("--quiet", "-q", action="store_true", help="print warnings and errors only")
    level.add_argument("--verbose", "-v", action="store_true", help="also print debug lines, with time and origin")
    group.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text (default), or json: one JSON object per line (time, level, logger, message) for "
                       "a journal or a log shipper, as an aggregator's service wants")
    return options


_LOG_OPTIONS = _log_options()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gefl",
        description="gefl-edge: model-heterogeneous federated learning (GeFL-F) for edge devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate", parents=[_LOG_OPTIONS],
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
    sim.add_argument("--transport", choices=["inprocess", "grpc", "mqtt"], default="inprocess",
                     help="inprocess (default): everything in this process; grpc: an aggregator on loopback and "
                     "one `gefl client run` process per client, over the real protocol; mqtt: the same through a "
                     "Mosquitto broker started on a free port")
    sim.add_argument("--broker", metavar="URL", help="with --transport mqtt: use this broker (mqtt://HOST:PORT) "
                     "instead of starting one")
    sim.add_argument("--tensorboard", metavar="DIR", help="write per-round scalars (accuracy per tier, loss, bytes, "
                     "simulated time) for `tensorboard --logdir DIR` (config key tensorboard; needs the tensorboard "
                     "extra)")
    sim.add_argument("--devices", metavar="YAML",
                     help="simulate a device mix (e.g. configs/devices.yaml): each client picks its tier by the "
                     "device policy and a simulated clock drives deadlines and stragglers")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="go on with a stopped or killed run from its last checkpoint (written after every round), "
                     "with the results an uninterrupted run has; its config is the run's config.yaml, and a "
                     "--config or --set that changes a key is refused")
    sim.set_defaults(func=_simulate)

    prb = sub.add_parser(
        "probe", parents=[_LOG_OPTIONS],
        help="describe this device and the tier it would train",
        description="Measure this device (CPU, memory, board, CUDA, a one-second training run) and pick its "
        "tier: the largest whose training fits in a fraction of the available memory and whose estimated round "
        "time meets the deadline (defaults from configs/devices.yaml, costs from configs/tiers.yaml).",
    )
    prb.add_argument("--json", action="store_true", help="print one JSON object (configs/schemas/probe.schema.json)")
    prb.add_argument("--tier", metavar="NAME", help="skip the policy and report this tier")
    prb.add_argument("--tiers", metavar="A,B,...",
                     help="tiers the federation offers (default: every tier in the catalogue but the opt-in "
                     "torchvision ones)")
    prb.add_argument("--deadline", type=float, metavar="S", help="round deadline in seconds (default 20)")
    prb.add_argument("--samples-per-round", type=int, metavar="N",
                     help="local samples x local epochs per round (default 3000)")
    prb.add_argument("--memory-fraction", type=float, metavar="F",
                     help="share of available memory training may use (default 0.8)")
    prb.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake device tree, for tests
    prb.set_defaults(func=_probe)

    exp = sub.add_parser(
        "export", parents=[_LOG_OPTIONS],
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

    smp = sub.add_parser(
        "samples", parents=[_LOG_OPTIONS],
        help="draw what a run's generator learned (a PNG grid per class)",
        description="Write a PNG with one row per class: generated images (gefl runs), or generated FE feature maps "
        "beside real ones from the run's frozen FE on test images (gefl-f runs), on one colour scale.",
    )
    smp.add_argument("run_dir", metavar="RUN_DIR", help="a gefl or gefl-f run directory (it has weights/generator.*)")
    smp.add_argument("--out", "-o", metavar="PNG", help="where to write the picture (default RUN_DIR/samples.png)")
    smp.add_argument("--per-class", type=int, default=8, metavar="N", help="samples per class (default 8)")
    smp.add_argument("--seed", type=int, default=0, help="random seed of the drawn samples (default 0)")
    smp.add_argument("--data-dir", metavar="DIR", help="where the run's dataset is, for real features (gefl-f)")
    smp.set_defaults(func=_samples)

    rep = sub.add_parser(
        "report", parents=[_LOG_OPTIONS],
        help="draw a run (or compare runs) as an HTML page with figures",
        description="Write RUN_DIR/report/ (or --out DIR): index.html, self-contained (opens from disk), with the "
        "summary and config, and a PNG per figure the run has data for: accuracy per tier with the phases shaded, "
        "training loss, bytes per client, simulated round time and stragglers (--devices runs), who contributed "
        "to each round (and why the others did not), the generator's samples. Given two or more run directories, "
        "writes a comparison into --out DIR: their mean-accuracy curves and a table. Needs matplotlib "
        "(pip install 'gefl-edge[report]').",
    )
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory; two or more to compare them")
    rep.add_argument("--out", "-o", metavar="DIR",
                     help="where the report goes (default RUN_DIR/report; required when comparing)")
    rep.set_defaults(func=_report)

    inf = sub.add_parser(
        "infer", parents=[_LOG_OPTIONS],
        help="classify images with an exported model (onnxruntime only, no torch)",
        description="Classify an image, or every image in a directory, with a model written by `gefl export`. "
        "Needs only onnxruntime, numpy and pillow (pip install 'gefl-edge[infer]').",
    )
    inf.add_argument("model", metavar="MODEL.onnx", help="a file written by `gefl export`")
    inf.add_argument("target", metavar="IMAGE|DIR", help="an image file, or a directory of images")
    inf.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely classes (default 1)")
    inf.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: all cores)")
    inf.set_defaults(func=_infer)

    dat = sub.add_parser(
        "data",
        help="prepare client data on disk",
        description="Prepare the data real clients train on.",
    )
    dat_sub = dat.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    spl = dat_sub.add_parser(
        "split", parents=[_LOG_OPTIONS],
        help="write each client's share of a dataset as an ImageFolder directory",
        description="Split a dataset's training set among clients exactly as `gefl simulate` does for the same "
        "dataset, partition and seed, and write DIR/client-000/, client-001/, ... in torchvision ImageFolder "
        "layout: one folder per class (every class, empty ones included, so labels line up), one PNG per image at "
        "its original size, named by its index in the training set. Also writes DIR/manifest.json with each "
        "client's label histogram.",
    )
    spl.add_argument("--dataset", default="fashion-mnist", metavar="NAME",
                     help="registered dataset (default: fashion-mnist; see `gefl list`)")
    spl.add_argument("--clients", type=int, required=True, metavar="N", help="number of clients")
    spl.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"],
                     help="how labels spread over clients (default: iid)")
    spl.add_argument("--out", "-o", required=True, metavar="DIR", help="a new or empty directory to write")
    spl.add_argument("--samples-per-client", default="600", metavar="N|all",
                     help="images per client drawn from the training set (default 600, the paper's); "
                     "all splits the whole set")
    spl.add_argument("--alpha", type=float, default=0.3, metavar="A",
                     help="Dirichlet concentration for --partition dirichlet; smaller is more skewed (default 0.3)")
    spl.add_argument("--shards-per-client", type=int, default=2, metavar="K",
                     help="label-sorted shards per client for --partition shards (default 2)")
    spl.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the split (default 0)")
    spl.add_argument("--data-dir", metavar="DIR", help="where the dataset files are")
    spl.set_defaults(func=_data_split)

    agg = sub.add_parser("aggregator", help="run a federation's aggregator",
                         description="The server side of a networked federation.")
    agg_sub = agg.add_subparsers(dest="action", required=True, metavar="ACTION")
    srv = agg_sub.add_parser(
        "serve", parents=[_LOG_OPTIONS], help="serve a federation over gRPC and/or MQTT until its last round",
        description="Hold the test set, register clients, run the config's rounds (quorum network.min_clients, "
        "deadline network.round_timeout), evaluate, and write the run directory `gefl simulate` writes into "
        "--state-dir, with a checkpoint after every round: started again on the same directory, it resumes.")
    srv.add_argument("--config", "-c", metavar="YAML", help=f"experiment config (default: configs/{DEFAULT_CONFIG})")
    srv.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config key; repeatable")
    srv.add_argument("--listen", metavar="HOST:PORT",
                     help="serve gRPC on this address (default 0.0.0.0:50051 unless --mqtt is given; give both "
                     "to serve gRPC and MQTT clients in one federation)")
    srv.add_argument("--state-dir", required=True, metavar="DIR", help="run directory and checkpoint")
    srv.add_argument("--data-dir", metavar="DIR", help="where the dataset's test set is (overrides data_dir)")
    srv.add_argument("--token-file", metavar="FILE", help="file holding the enrolment token clients must present "
                     "(default: $GEFL_TOKEN, else the one generated and kept in STATE_DIR/enrolment-token); never "
                     "on the command line, where `ps` shows it")
    srv.add_argument("--token", dest="token_flag", help=argparse.SUPPRESS)  # removed: refused with the why
    srv.add_argument("--tls-cert", metavar="PEM", help="server certificate: serve TLS")
    srv.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    srv.add_argument("--client-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)")
    srv.add_argument("--insecure", action="store_true",
                     help="allow plaintext (no --tls-cert, or an mqtt:// broker) on an address that is not loopback: "
                     "tokens and model weights then cross the network in clear")
    srv.add_argument("--mqtt", metavar="URL", help="also (or only) serve through this MQTT broker: mqtt://HOST:PORT or "
                     "mqtts://HOST:PORT (TLS); topics under gefl/<config name>/, or /FEDERATION at the URL's end")
    srv.add_argument("--mqtt-user", metavar="USER", help="MQTT username (password from $GEFL_MQTT_PASSWORD)")
    srv.add_argument("--mqtt-ca", metavar="PEM", help="CA certificate that signed the broker's (mqtts://)")
    srv.add_argument("--mqtt-cert", metavar="PEM", help="client certificate for the broker, if it asks for one")
    srv.add_argument("--mqtt-key", metavar="PEM", help="private key of --mqtt-cert")
    srv.add_argument("--status", metavar="HOST:PORT",
                     help="serve a live status page (and status.json) here: clients, tiers, the open round, accuracy "
                     "so far; off by default. Off loopback it needs an admin token ($GEFL_STATUS_TOKEN or "
                     "--status-token-file)")
    srv.add_argument("--status-token-file", metavar="FILE", help="file holding the status page's admin token")
    srv.add_argument("--tensorboard", metavar="DIR", help="write per-round scalars for TensorBoard into DIR (config "
                     "key tensorboard; needs the tensorboard extra)")
    srv.set_defaults(func=_aggregator_serve)

    sts = agg_sub.add_parser(
        "status", parents=[_LOG_OPTIONS], help="print a running aggregator's status (its --status page)",
        description="Read the status.json of an aggregator started with --status, and print its clients and "
        "open round as a table (or the JSON with --json).")
    sts.add_argument("url", metavar="URL", help="the status page, e.g. http://127.0.0.1:8080/")
    sts.add_argument("--json", action="store_true", help="print status.json as it is")
    sts.add_argument("--status-token-file", metavar="FILE",
                     help="file holding the admin token (default: $GEFL_STATUS_TOKEN)")
    sts.set_defaults(func=_aggregator_status)

    cli = sub.add_parser("client", help="take part in a federation from this device",
                         description="The edge side of a networked federation.")
    cli_sub = cli.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = cli_sub.add_parser(
        "run", parents=[_LOG_OPTIONS], help="register with an aggregator and train until the run is over",
        description="Register with the aggregator (device profile in, tier and run config out), then train the "
        "rounds it hands out on the local data: an ImageFolder directory, one sub-folder per class (`gefl data "
        "split` writes them). Reconnects with backoff while the aggregator is away.")
    run.add_argument("--aggregator", required=True, metavar="HOST:PORT|mqtt[s]://HOST:PORT",
                     help="the aggregator's gRPC address, or the MQTT broker it serves through (mqtts:// for TLS; "
                     "add /FEDERATION when the broker serves more than one)")
    run.add_argument("--data-dir", required=True, metavar="DIR", help="this client's images, ImageFolder layout")
    run.add_argument("--tier", default="auto", metavar="auto|NAME",
                     help="auto (default): probe this device and let the aggregator pick; or a tier name")
    run.add_argument("--token-file", metavar="FILE", help="file holding the federation's enrolment token "
                     "(default: $GEFL_TOKEN); never on the command line, where `ps` shows it")
    run.add_argument("--token", dest="token_flag", help=argparse.SUPPRESS)  # removed: refused with the why
    run.add_argument("--name", metavar="NAME", help="stable name of this device (default: the hostname)")
    run.add_argument("--ca", metavar="PEM", help="CA certificate of the aggregator (or the broker): connect with TLS")
    run.add_argument("--cert", metavar="PEM", help="this client's certificate, for mutual TLS")
    run.add_argument("--mqtt-user", metavar="USER", help="MQTT username (password from $GEFL_MQTT_PASSWORD); "
                     "also the default --name, since a broker ACL ties a device's topics to its username")
    run.add_argument("--key", metavar="PEM", help="private key of --cert")
    run.add_argument("--insecure", action="store_true",
                     help="allow plaintext (no --ca, or mqtt://) to an aggregator that is not on loopback: the "
                     "token and model weights then cross the network in clear")
    run.add_argument("--threads", type=int, metavar="N", help="torch threads for training (default: all cores)")
    run.add_argument("--give-up", type=float, metavar="S",
                     help="exit when the aggregator has been unreachable this many seconds (default: never)")
    run.add_argument("--state-dir", metavar="DIR",
                     help="where this device keeps the credential of its registration, which it needs to register "
                     "again under its name (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/gefl, else "
                     "~/.local/state/gefl)")
    run.add_argument("--share-label-histogram", action="store_true",
                     help="send this device's label counts at registration (they land in the run's partition.json); "
                     "off by default: a board's label distribution is private and no algorithm needs it")
    run.set_defaults(func=_client_run)

    svc = cli_sub.add_parser(
        "service", parents=[_LOG_OPTIONS], help="print the systemd unit that runs `gefl client run` at boot",
        description="Print the systemd unit shipped with gefl-edge (gefl-client.service) for a board's client, "
        "so that: gefl client service --gefl-path \"$(command -v gefl)\" > /etc/systemd/system/gefl-client.service. "
        "It reads GEFL_AGGREGATOR, GEFL_CLIENT_DATA and GEFL_CLIENT_ARGS from /etc/gefl/client.env (--env prints "
        "an example) and the enrolment token from /etc/gefl/token, and runs as an unprivileged dynamic user, "
        "restarted on failure; the unit's comments say how to change any of it.")
    svc.add_argument("--gefl-path", metavar="PATH", help=f"absolute path of the gefl executable for ExecStart= "
                     f"(default: {SHIPPED_GEFL}, as shipped)")
    svc.add_argument("--env", action="store_true", help="print an example /etc/gefl/client.env instead")
    svc.set_defaults(func=_client_service)

    crt = sub.add_parser(
        "certs", parents=[_LOG_OPTIONS],
        help="make the CA and certificates of a federation (mutual TLS for gRPC and Mosquitto)",
        description="Make a small PKI in --out DIR: DIR/ca.crt and ca.key (a new CA, or the one already there), "
        "DIR/server.crt and server.key (the aggregator's or broker's, for --server-name / --server-ip) and "
        "DIR/clients/NAME.crt and NAME.key per --client (common name NAME: the device's --name, and its MQTT "
        "username under Mosquitto's use_identity_as_username). Keys are written with mode 0600. Existing files "
        "are kept: run it again with a new --client to enrol a board, signed by the same CA.")
    crt.add_argument("--out", "-o", required=True, metavar="DIR", help="where the files go (created if missing)")
    crt.add_argument("--server-name", action="append", metavar="NAME",
                     help="DNS name clients use to reach the aggregator (or broker); repeatable (default, when "
                     "neither this nor --server-ip is given: localhost and 127.0.0.1)")
    crt.add_argument("--server-ip", action="append", metavar="IP",
                     help="IP address clients use to reach it; repeatable")
    crt.add_argument("--client", action="append", metavar="NAME",
                     help="a device to issue a certificate for (its gefl client name); repeatable")
    crt.add_argument("--days", type=int, metavar="N",
                     help="validity of new server and client certificates (default 1825, five years; never past "
                     "the CA's ten)")
    crt.set_defaults(func=_certs)

    ls = sub.add_parser("list", parents=[_LOG_OPTIONS], help="list tiers, datasets, algorithms and generator families")
    ls.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(quiet=args.quiet, verbose=args.verbose, json_lines=args.log_format == "json")
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
