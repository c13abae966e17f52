"""Peak memory of a real `gefl client run` training the smallest tier, under each torch build.

The tier catalogue (benchmarks/tiers.py) measures training alone; a board runs the whole client:
gRPC, the image folder, the algorithm, heartbeats, torch. Whether a 512 MB Raspberry Pi Zero 2 W
can take part is decided by that process, so this runs one for real: a `gefl aggregator serve` on
loopback (from this interpreter's environment, on a free port, with a tiny copy of
configs/quickstart.yaml: one client, tier cnn3c, 2 rounds) and one `gefl client run --tier cnn3c`
from each client environment given, its enrolment token passed in $GEFL_TOKEN (read from the
aggregator's STATE_DIR/enrolment-token). The client's RSS (children included) is sampled every 50 ms;
its VmHWM (the kernel's own peak, between samples too) is kept as well.

Then, to say where the memory goes, each environment imports what the client imports, one step at
a time, in a fresh process, and the RSS after every step is recorded (`import_steps`); and with
--without-dynamo each client runs once more with torch._dynamo replaced by a do-nothing stand-in, to
measure what not importing it would save (a what-if: nothing in gefl does this).

    python benchmarks/client_memory.py --client /work/venv-cpu/bin/gefl --client .venv/bin/gefl --without-dynamo

Writes benchmarks/results/client_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from gefl.aggregator.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "client_memory"
TIER = "cnn3c"
"""The smallest tier (5,406 parameters): if a board cannot train it, it cannot take part at all."""
TARGET_MB = 350.0
"""A Raspberry Pi Zero 2 W has 512 MB, of which the OS leaves about 380 MB; 350 MB of client leaves it
some room for the page cache and the rest of the system."""
SAMPLE_S = 0.05
SAMPLES_PER_CLIENT = 600
_MB = 1024**2

IMPORT_STEPS: list[tuple[str, str]] = [
    ("python", "pass"),
    ("numpy, yaml", "import numpy, yaml"),
    ("grpc", "import grpc"),
    ("gefl.edge_client.grpc_transport (protobuf stubs)", "import gefl.edge_client.grpc_transport"),
    ("gefl.edge_client.runtime", "import gefl.edge_client.runtime"),
    ("torch", "import torch"),
    ("gefl.algorithms (models, generators, training)", "import gefl.algorithms"),
    ("first torch.optim optimizer (imports torch._dynamo, sympy)",
     "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)"),
]
"""What `gefl client run` loads, in its order: the transport before registering, gefl.algorithms (and
torch) before the first round, then the first optimizer of local training."""

_STEP_CHILD = """
import json, re, sys, time
steps = json.loads(sys.argv[1])
def status():
    text = open("/proc/self/status").read()
    get = lambda key: int(re.search(rf"^{key}:\\s+(\\d+) kB", text, re.M).group(1)) / 1024
    return {"rss_mb": get("VmRSS"), "anon_mb": get("RssAnon"), "file_mb": get("RssFile"), "modules": len(sys.modules)}
out = []
for name, code in steps:
    started = time.perf_counter()
    exec(code, globals())
    out.append({"step": name, "seconds": time.perf_counter() - started, **status()})
print(json.dumps(out))
"""


WITHOUT_DYNAMO = """
import sys, types
# What-if only. torch.optim's first use imports torch._dynamo (and with it sympy, ~800 modules) to wrap
# its methods in torch._dynamo.disable and graph_break, which do nothing outside torch.compile.
stub = types.ModuleType("torch._dynamo")
stub.disable = lambda fn=None, recursive=True, wrapping=True, **kwargs: fn
stub.graph_break = lambda: None
sys.modules["torch._dynamo"] = stub
from gefl.cli import main
sys.exit(main())
"""


def python_of(gefl: Path) -> Path:
    """The interpreter beside a venv's `gefl` script (its bin/ directory)."""
    return gefl.parent / "python"


def describe(gefl: Path) -> dict:
    code = ("import json, sys, torch; print(json.dumps({'python': sys.executable, 'torch': torch.__version__, "
            "'cuda': torch.version.cuda}))")
    out = subprocess.run([str(python_of(gefl)), "-c", code], capture_output=True, text=True, check=True, timeout=300)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["gefl"] = str(gefl)
    info["build"] = "CPU build" if info["cuda"] is None else "CUDA build"
    return info


def write_config(path: Path, algorithm: str, rounds: int) -> dict:
    """configs/quickstart.yaml, shrunk: one client, the smallest tier, `rounds` head rounds (gefl-f adds one
    warm-up and one generator round), evaluation once at the end."""
    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg.update(name=f"client-memory-{algorithm}", algorithm=algorithm, num_clients=1, rounds=rounds, tiers=[TIER],
               eval={"every": rounds}, network={"min_clients": 1, "round_timeout": 600})
    cfg["gefl"] = {**cfg.get("gefl", {}), "warmup_rounds": 1, "generator_rounds": 1}
    cfg["gefl"]["generator"] = {**cfg["gefl"].get("generator", {}), "local_epochs": 1}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


class _Output(threading.Thread):
    """A process's output lines with the time each arrived, read as they come (a full pipe would stall it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc, self.lines = proc, []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float) -> None:
        until = time.monotonic() + timeout
        while not any(text in line for _, line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"no {text!r} from {self.proc.args[:3]}; it said:\n"
                                   + "\n".join(line for _, line in self.lines[-30:]))
            time.sleep(0.05)


def _status_mb(pid: int) -> dict[str, float]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(kb) / 1024 for key, kb in re.findall(r"^(VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


class _RssSampler(threading.Thread):
    """RSS of a process and its children every `interval` s: the client's peak lasts for part of a round."""

    def __init__(self, pid: int, interval: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self.hwm_mb = 0.0
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:  # exited (or a child did) between the listing and the reading
                if not root.is_running():
                    return
                continue
            if rss == 0:  # a zombie: exited, not yet reaped
                return
            status = _status_mb(self.pid)
            self.hwm_mb = max(self.hwm_mb, status.get("VmHWM", 0.0))
            self.samples.append({"t": time.monotonic(), "rss_mb": rss / _MB, "anon_mb": status.get("RssAnon"),
                                 "file_mb": status.get("RssFile")})
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_federation(client: dict, algorithm: str, rounds: int, data: Path, work: Path, threads: int | None) -> dict:
    """One aggregator and one client on loopback, to the end of the run; the client's memory over time."""
    work.mkdir(parents=True)
    config = work / "config.yaml"
    write_config(config, algorithm, rounds)
    port = free_port()
    state = work / "state"
    server_gefl = Path(sys.executable).parent / "gefl"
    serve = [str(server_gefl), "aggregator", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
             "--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if k != "GEFL_TOKEN"}  # the aggregator generates one
    env["PYTHONUNBUFFERED"] = "1"
    aggregator = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    agg_out = _Output(aggregator)
    proc = None
    try:
        agg_out.wait_for("gefl aggregator:", 300)
        token = (state / "enrolment-token").read_text().strip()
        launcher = [str(python_of(Path(client["gefl"]))), "-c", WITHOUT_DYNAMO] if client.get("variant") else [
            client["gefl"]]
        cmd = [*launcher, "client", "run", "--aggregator", f"127.0.0.1:{port}", "--data-dir",
               str(data / "client-000"), "--tier", TIER, "--name", "memory-probe", "--give-up", "120"]
        if threads:
            cmd += ["--threads", str(threads)]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, "GEFL_TOKEN": token})
        sampler = _RssSampler(proc.pid)
        out = _Output(proc)
        code = proc.wait(timeout=1800)
        sampler.stop()
        out.join(5)
        if code != 0:
            raise RuntimeError(f"the client exited {code}:\n" + "\n".join(line for _, line in out.lines[-30:]))
        aggregator.wait(timeout=120)
    finally:
        for p in (proc, aggregator):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    samples = sampler.samples
    peak = max(samples, key=lambda s: s["rss_mb"])
    registered = next((t for t, line in out.lines if "registered with" in line), None)
    before = [s for s in samples if registered is not None and s["t"] <= registered]
    rounds_trained = [line for _, line in out.lines if re.match(r"round \d+ \(", line)]
    return {
        "algorithm": algorithm, "rounds": len(rounds_trained), "tier": TIER,
        "peak_rss_mb": peak["rss_mb"], "peak_anon_mb": peak["anon_mb"], "peak_file_mb": peak["file_mb"],
        "vmhwm_mb": sampler.hwm_mb, "peak_at_s": peak["t"] - started,
        "rss_at_registration_mb": before[-1]["rss_mb"] if before else None,
        "wall_s": samples[-1]["t"] - started, "samples": len(samples),
        "client_output": [f"{t - started:7.2f} s  {line}" for t, line in out.lines],
        "rss_trace": [[round(s["t"] - started, 3), round(s["rss_mb"], 1)] for s in samples],
    }


def import_steps(gefl: Path) -> list[dict]:
    """RSS after each import the client makes, in a fresh process of that environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(python_of(gefl)), "-c", _STEP_CHILD, json.dumps(IMPORT_STEPS)], capture_output=True,
                         text=True, check=True, timeout=600, env=env)
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    for before, step in zip([None, *steps], steps):
        step["delta_rss_mb"] = step["rss_mb"] - (before["rss_mb"] if before else 0.0)
        step["delta_anon_mb"] = step["anon_mb"] - (before["anon_mb"] if before else 0.0)
        step["delta_modules"] = step["modules"] - (before["modules"] if before else 0)
    return steps


def write_results(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Memory of a real `gefl client run` ({result['date']}, {result['machine']})",
        "",
        f"One `gefl client run --tier {TIER}` against a `gefl aggregator serve` on loopback (configs/quickstart.yaml "
        f"shrunk: 1 client, {SAMPLES_PER_CLIENT} Fashion-MNIST images, {result['rounds']} head rounds; gefl-f adds a "
        "warm-up and a generator round), per torch build of the client's environment. Peak RSS: the client and its "
        f"children, sampled every {1000 * SAMPLE_S:.0f} ms; VmHWM: the kernel's peak of the client process. "
        f"Target: <= {TARGET_MB:.0f} MB, so that a 512 MB Raspberry Pi Zero 2 W can train. Written by "
        "`python benchmarks/client_memory.py`.",
        "",
        "| client build | torch | algorithm | rounds | peak RSS MB | VmHWM MB | anon / file MB at peak "
        "| RSS at registration MB | within target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        label = run["build"] + (f", {run['variant']}" if run.get("variant") else "")
        lines.append(
            f"| {label} | {run['torch']} | {run['algorithm']} | {run['rounds']} | {run['peak_rss_mb']:.1f} | "
            f"{run['vmhwm_mb']:.1f} | {run['peak_anon_mb']:.1f} / {run['peak_file_mb']:.1f} | "
            + (f"{run['rss_at_registration_mb']:.1f}" if run["rss_at_registration_mb"] is not None else "-")
            + f" | {'yes' if max(run['peak_rss_mb'], run['vmhwm_mb']) <= TARGET_MB else 'no'} |")
    lines += ["", "Where it goes: RSS after each step of what the client imports, one fresh process per build "
              "(deltas in brackets).", ""]
    builds = result["import_steps"]
    lines.append("| step | " + " | ".join(f"{b} RSS MB (+delta) | modules" for b in builds) + " |")
    lines.append("|---|" + "---|---|" * len(builds))
    names = [s["step"] for s in next(iter(builds.values()))]
    for i, name in enumerate(names):
        cells = [f"{builds[b][i]['rss_mb']:.1f} (+{builds[b][i]['delta_rss_mb']:.1f}) | {builds[b][i]['modules']}"
                 for b in builds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="append", type=Path, metavar="GEFL",
                        help="a venv's gefl script to run the client from; repeatable (default: this venv's)")
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "gefl-f"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--without-dynamo", action="store_true",
                        help="also run each client with torch._dynamo stubbed out (what-if: the memory it costs)")
    parser.add_argument("--threads", type=int, default=None, help="client --threads (default: the client's own)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    clients = [describe(g.absolute()) for g in (args.client or [Path(sys.executable).parent / "gefl"])]
    if args.without_dynamo:
        clients += [{**c, "variant": "torch._dynamo stubbed (what-if)"} for c in clients]
    with tempfile.TemporaryDirectory(prefix="gefl-client-memory-") as scratch:
        work = args.work or Path(scratch)
        data = work / "data"
        if not data.exists():
            subprocess.run([str(Path(sys.executable).parent / "gefl"), "data", "split", "--clients", "2",
                            "--samples-per-client", str(SAMPLES_PER_CLIENT), "--out", str(data)], check=True)
        runs = []
        for client in clients:
            for algorithm in args.algorithms:
                name = f"{client['build'].split()[0].lower()}{'-stub' if client.get('variant') else ''}-{algorithm}"
                run = run_federation(client, algorithm, args.rounds, data, work / name, args.threads)
                runs.append({**client, **run})
                label = client["build"] + (" (dynamo stubbed)" if client.get("variant") else "")
                print(f"{label:<27} torch {client['torch']:<14} {algorithm:<7} {run['rounds']} rounds: "
                      f"peak RSS {run['peak_rss_mb']:6.1f} MB (VmHWM {run['vmhwm_mb']:6.1f} MB), "
                      f"{run['wall_s']:.0f} s", flush=True)
    steps = {c["build"]: import_steps(Path(c["gefl"])) for c in clients if not c.get("variant")}
    for build, rows in steps.items():
        print(build + ": " + ", ".join(f"{r['step']} {r['rss_mb']:.0f} MB" for r in rows))
    from gefl.edge_client.probe import cpu_model

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "tier": TIER, "rounds": args.rounds, "target_mb": TARGET_MB, "runs": runs, "import_steps": steps}
    write_results(args.out, result)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
