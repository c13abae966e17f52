"""What the gRPC and MQTT transports themselves cost a round: echo rounds, no training, real processes.

The aggregator is the production Coordinator and gRPC server with an `EchoLogic` round: it sends
random bytes and takes back only those same bytes (sha256-checked), so every second of a round is
transport and coordination, none of it training. Echo clients are threads, each with its own
GrpcClientTransport and its own TCP connection, in a few processes, like devices would be. Small
liveness runs measure how fast round 1 opens once the quorum is there, and how fast a client
killed (SIGKILL) or frozen (SIGSTOP) in the middle of a round stops holding the round up.

Nothing here imports torch (each process checks `'torch' not in sys.modules`), so a hundred echo
clients fit on a small machine next to the aggregator.

    python benchmarks/transport.py                  # every row; writes benchmarks/results/transport.*
    python benchmarks/transport.py --big no         # without the 100 clients x 22 MB row
    python benchmarks/transport.py --quick          # tiny rows, a smoke check (written to a temp dir)

The 100 clients x 22 MB row (4.4 GB through loopback per round) runs only when the 10 x 22 MB
row of the same run predicts it fits in memory and in two minutes (`--big yes` forces it).

Round overhead = the coordinator's round open -> round close (monotonic, in the aggregator), the
median over rounds 2.. (round 1 warms the connections up). MB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gefl.aggregator.mosquitto import free_port
from gefl.edge_client.probe import cpu_model

from gefl.errors import GeflError
from gefl.rounds.federation import Phase

if TYPE_CHECKING:
    from gefl.algorithms import ClientResult
    from gefl.protocol import RegisterRequest
    from gefl.rounds.federation import RoundInfo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MB = 1 << 20
TOKEN = "transport-benchmark-enrolment"
PHASE = "echo"
UPLOAD = "model"
ROUND_TIMEOUT_S = 120.0
HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S = 1.0, 3.0
POLL_S = 10.0
STALL_KILL_AFTER_S = 1.0
"""The stalling client is killed this long after it took its round-2 task (the round has just opened)."""

BIG_ROW_BUDGET_S = 120.0
"""The 100 clients x 22 MB row runs only if it is predicted to take less than this."""

TARGETS = {
    "round_overhead_s": 0.3,   # 10 clients x 1 MB, median
    "dead_client_s": 5.0,      # kill -> the round closes without it
    "first_round_s": 3.0,      # last registration -> round 1 opens
}


# --------------------------------------------------------------------------- the echo round


class EchoLogic:
    """A RoundLogic that sends one random payload and accepts only that payload back.

    Random bytes (not zeros) so nothing on the way can compress them; one payload made once, so
    the aggregator's per-round cost is the transport's, not the benchmark's. The sha256 check is
    the proof that the payload went both ways intact; a mismatch refuses the upload, which the
    client reports and the row fails on.
    """

    federation = "bench"
    config_yaml = "{}"

    def __init__(self, size: int, rounds: int, seed: int = 0) -> None:
        self.rounds = rounds
        self.payload = np.random.default_rng(seed).bytes(size)
        self.payload_sha256 = hashlib.sha256(self.payload).hexdigest()
        self.closed: dict[int, dict] = {}
        """Per closed round: how many results counted and who dropped (small, for the report)."""

    def phases(self) -> list[Phase]:
        return [Phase(PHASE, self.rounds, False)]

    def choose_tier(self, request: RegisterRequest) -> tuple[str, str]:
        return "echo", "benchmark echo client"

    def begin_round(self, info: RoundInfo) -> None:
        pass

    def artifacts(self, info: RoundInfo, tier: str) -> dict[str, bytes]:
        return {UPLOAD: self.payload}

    def check(self, info: RoundInfo, result: ClientResult) -> bool:
        if hashlib.sha256(result.state).hexdigest() != self.payload_sha256:
            raise GeflError(f"client {result.client_id} echoed {len(result.state):,} bytes that are not the "
                            f"{len(self.payload):,} bytes it was sent")
        return True

    def end_round(self, info: RoundInfo, results: dict[int, Any], record: dict) -> str:
        self.closed[info.number] = {"results": len(results), "dropped": list(record["dropped"])}
        return ""

    def record(self, record: dict) -> None:
        pass

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        return {}, {}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict, completed: int) -> None:
        pass

    def finish(self, clients: list[dict], wall_s: float) -> None:
        pass


# --------------------------------------------------------------------------- child processes


def _rss_mb(pid: int) -> float:
    """Peak resident memory of another process (the broker), from /proc: VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _watchdog(deadline_s: float) -> None:
    """Children end themselves if the benchmark that started them dies or overruns, so no echo
    client or aggregator outlives a crashed or interrupted run."""
    parent, until = os.getppid(), time.monotonic() + deadline_s

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)
            if time.monotonic() > until:
                print(f"transport benchmark child {os.getpid()}: past its {deadline_s:.0f} s deadline, exiting; "
                      "where its threads were:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)  # what it hung on, for the report
                os._exit(4)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


_REGISTERED = re.compile(r"^client (\d+) registered: ")
_OFFLINE = re.compile(r"^client (\d+) \((.*?)\) is offline: (.*)$")


def run_aggregator(args: argparse.Namespace) -> int:
    """The production coordinator and gRPC server around an EchoLogic; one JSON line at the end."""
    from gefl.aggregator.coordinator import Coordinator, Settings
    from gefl.aggregator.grpc_server import start_server

    from gefl.rounds.loop import RoundLoop

    log: list[tuple[float, str]] = []

    class Timed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Logged inside the coordinator's lock for registrations: the timestamp of the last
            # registration is therefore before round 1 opens, never after.
            log.append((time.monotonic(), record.getMessage()))
            if args.verbose:
                print(f"  aggregator: {record.getMessage()}", file=sys.stderr, flush=True)

    gefl_log = logging.getLogger("gefl")
    gefl_log.addHandler(Timed())
    gefl_log.setLevel(logging.INFO)

    logic = EchoLogic(args.size, args.rounds)
    settings = Settings(num_clients=args.clients, min_clients=args.min_clients, round_timeout=ROUND_TIMEOUT_S,
                        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout)
    coordinator = Coordinator(logic, settings, TOKEN)
    coordinator.loop = RoundLoop(logic, coordinator, num_clients=args.clients, quorum=args.min_clients)
    if args.transport == "mqtt":  # the bridge to the broker the parent started on --port
        from gefl.aggregator.mqtt_bridge import MqttBridge

        from gefl.protocol.mqtt import MqttAuth, parse_broker_url

        bridge = MqttBridge(coordinator, parse_broker_url(f"mqtt://127.0.0.1:{args.port}/{logic.federation}"),
                            MqttAuth())
        bridge.start()
        port, stop = args.port, bridge.stop
    else:
        server, port, _ = start_server(coordinator, f"127.0.0.1:{args.port}")
        stop = lambda: server.stop(grace=2).wait()  # noqa: E731
    try:
        _emit({"ready": port})
        while len(coordinator.clients) < args.start_when:
            time.sleep(0.01)
        coordinator.run()
        registered: dict[int, float] = {}
        offline = []
        for t, text in list(log):
            if m := _REGISTERED.match(text):
                registered.setdefault(int(m.group(1)), t)
            elif m := _OFFLINE.match(text):
                offline.append({"t": t, "client_id": int(m.group(1)), "name": m.group(2), "why": m.group(3)})
        rounds = [{"round": n, "opened": coordinator.round_started.get(n), "closed": coordinator.round_closed.get(n),
                   **logic.closed.get(n, {})} for n in range(1, args.rounds + 1)]
        _emit({"role": "aggregator", "rounds": rounds, "registered": {str(k): v for k, v in registered.items()},
               "offline": offline, "peak_rss_mb": _peak_rss_mb(), "torch_imported": "torch" in sys.modules})
    finally:
        stop()
    return 0


def _own_connection_transport(address: str) -> Any:
    """A GrpcClientTransport on its own TCP connection (an MqttClientTransport has one anyway).

    gRPC shares one connection among all channels of a process that have the same target and
    options (its global subchannel pool): twenty-five "devices" in one process would be one
    HTTP/2 connection, which no real federation has. A local subchannel pool per channel gives
    each echo client its own connection.
    """
    if address.startswith("mqtt://"):
        from gefl.edge_client.mqtt_transport import MqttClientTransport

        from gefl.protocol.mqtt import MqttAuth, parse_broker_url

        return MqttClientTransport(parse_broker_url(address), TOKEN, MqttAuth())
    from gefl.edge_client.grpc_transport import GrpcClientTransport

    return GrpcClientTransport(address, TOKEN, channel_options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass
class _ClientReport:
    name: str
    rounds: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    heartbeat_breaks: int = 0


def _heartbeat(transport: Any, interval: float, stop: threading.Event, report: _ClientReport) -> None:
    """Hold the heartbeat stream as edge_client/runtime.py does (reconnect if it breaks), counting
    breaks: on loopback there should be none, and one makes the aggregator drop the client."""
    while not stop.is_set():
        try:
            transport.heartbeats(interval, stop)
            return
        except GeflError as exc:
            if stop.is_set():
                return
            report.heartbeat_breaks += 1
            report.errors.append(f"heartbeat stream broke: {exc}")
            stop.wait(0.5)


def echo_client(address: str, name: str, stall: bool, report: _ClientReport) -> None:
    """Register, then echo every round's artifacts back until the run is finished.

    With `stall`, the client takes its first task from round 2 on, says so on stdout and sleeps
    with its heartbeat still going: a device that hung mid-round, which the benchmark then kills.
    """
    from gefl.edge_client.transport import Unavailable

    from gefl.protocol import FINISHED, TRAIN, RegisterRequest, UploadHeader
    from gefl.protocol.wire import sha256

    transport = _own_connection_transport(address)
    stop = threading.Event()
    heartbeat = None
    try:
        until = time.monotonic() + 30
        while True:
            try:
                reg = transport.register(RegisterRequest(name=name, tier="echo", num_samples=1))
                break
            except Unavailable:
                if time.monotonic() > until:
                    raise
                time.sleep(0.2)
        heartbeat = threading.Thread(target=_heartbeat, args=(transport, reg.heartbeat_interval_s, stop, report),
                                     name=f"heartbeat-{name}", daemon=True)
        heartbeat.start()
        while True:
            task = transport.fetch_task(POLL_S)
            if task.status == FINISHED:
                return
            if task.status != TRAIN:
                continue
            got = time.monotonic()
            if stall and task.round >= 2:
                _emit({"stalling": task.round, "name": name, "t": got})
                while True:
                    time.sleep(60)
            arts = {ref.name: transport.download(task.round, ref) for ref in task.artifacts}
            downloaded = time.monotonic()
            data = arts[task.upload_name]
            transport.upload(UploadHeader(task.round, task.phase, task.upload_name, len(data), sha256(data), 1, 0.0),
                             data)
            report.rounds.append({"round": task.round, "task": got, "downloaded": downloaded,
                                  "uploaded": time.monotonic()})
    except Exception as exc:  # reported, and the row fails on it
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        if heartbeat is not None:
            heartbeat.join(5)
        transport.close()


def run_clients(args: argparse.Namespace) -> int:
    """`--count` echo clients as threads of this process; one JSON line with their reports at the end."""
    address = f"mqtt://127.0.0.1:{args.port}/{EchoLogic.federation}" if args.transport == "mqtt" else \
        f"127.0.0.1:{args.port}"
    reports = [_ClientReport(f"echo-{args.prefix}-{i}") for i in range(args.count)]
    threads = [threading.Thread(target=echo_client, args=(address, r.name, args.stall, r), name=r.name)
               for r in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _emit({"role": "clients", "clients": [r.__dict__ for r in reports], "peak_rss_mb": _peak_rss_mb(),
           "torch_imported": "torch" in sys.modules})
    return 1 if any(r.errors for r in reports) else 0


# --------------------------------------------------------------------------- the parent: processes


def progress(text: str) -> None:
    print(f"[transport] {text}", file=sys.stderr, flush=True)


def loopback_bytes() -> int | None:
    import psutil

    nic = psutil.net_io_counters(pernic=True).get("lo")
    return nic.bytes_sent if nic else None


class Child:
    """A child process of this script whose stdout lines (JSON) arrive on a queue, so the parent
    can wait for one line with a timeout while the child keeps running."""

    def __init__(self, role_args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        self.args = role_args
        self.popen = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *role_args],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                print(line, end="", file=sys.stderr)
        self.lines.put(None)

    def expect(self, key: str, timeout: float) -> dict:
        """The next stdout line that has `key`; raises if the child exits or is silent for `timeout`."""
        until = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{' '.join(self.args[:2])}: no {key!r} line within {timeout:.0f} s") from None
            if line is None:
                self.popen.wait()
                raise RuntimeError(f"{' '.join(self.args[:2])} exited ({self.popen.returncode}) without a {key!r} line")
            if key in line:
                return line

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextmanager
def fleet() -> Iterator[list[Child]]:
    """Every process a run starts goes in this list; all of them are stopped on the way out,
    whether the run worked, failed or was interrupted."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for child in children:
            child.stop()


def start_aggregator(children: list[Child], port: int, clients: int, min_clients: int, size: int, rounds: int,
                     deadline: float, verbose: bool, start_when: int = 0, transport: str = "grpc",
                     liveness: tuple[float, float] = (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S)) -> Child:
    agg = Child(["--role", "aggregator", "--port", str(port), "--clients", str(clients), "--min-clients",
                 str(min_clients), "--size", str(size), "--rounds", str(rounds), "--deadline", str(deadline),
                 "--start-when", str(start_when), "--transport", transport, "--heartbeat-interval",
                 str(liveness[0]), "--heartbeat-timeout", str(liveness[1])] + (["--verbose"] if verbose else []))
    children.append(agg)
    agg.expect("ready", 60)
    return agg


def start_clients(children: list[Child], port: int, count: int, prefix: str, deadline: float,
                  stall: bool = False, transport: str = "grpc") -> Child:
    child = Child(["--role", "clients", "--port", str(port), "--count", str(count), "--prefix", prefix,
                   "--deadline", str(deadline), "--transport", transport] + (["--stall"] if stall else []))
    children.append(child)
    return child


def _finish(agg: Child, clients: list[Child], timeout: float) -> tuple[dict, list[dict]]:
    """The aggregator's and every client process's final report; the processes have exited."""
    result = agg.expect("role", timeout)
    reports = []
    for c in clients:
        try:
            reports.append(c.expect("role", 120))  # a process of 125 MQTT clients takes a while to close
        except RuntimeError as exc:  # kept: the aggregator's side of the row is still worth reporting
            reports.append({"clients": [], "peak_rss_mb": 0.0, "torch_imported": False, "failed": str(exc)})
    for child in (agg, *clients):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(30)
    return result, reports


def _row_timeout(clients: int, size: int, rounds: int) -> float:
    """Generous: 20 MB/s of echo traffic per round is far below what loopback does here."""
    return 60 + rounds * (10 + 2 * size * clients / (20 * MB))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- the measurements


def echo_row(clients: int, procs: int, size: int, rounds: int, verbose: bool = False, transport: str = "grpc",
             liveness: tuple[float, float] = (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S)) -> dict:
    """One row: `clients` echo clients in `procs` processes, `rounds` echo rounds of `size` bytes,
    over gRPC or through a Mosquitto broker started for the row (MQTT); `liveness`: the heartbeat
    interval and timeout the aggregator hands its clients."""
    timeout = _row_timeout(clients, size, rounds)
    port = free_port()
    lo_before = loopback_bytes()
    wall = time.monotonic()
    with fleet() as children, contextlib.ExitStack() as stack:
        broker_rss = None
        if transport == "mqtt":
            from gefl.aggregator.mosquitto import Mosquitto

            broker = stack.enter_context(Mosquitto(port))
        agg = start_aggregator(children, port, clients, clients, size, rounds, timeout + 30, verbose,
                               transport=transport, liveness=liveness)
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        client_procs = [start_clients(children, port, n, f"p{i}", timeout + 30, transport=transport)
                        for i, n in enumerate(per)]
        result, reports = _finish(agg, client_procs, timeout)
        if transport == "mqtt":
            broker_rss = _rss_mb(broker.process.pid)
    lo_after = loopback_bytes()
    wall = time.monotonic() - wall

    rows = result["rounds"]
    overhead = [r["closed"] - r["opened"] for r in rows if r["opened"] is not None and r["closed"] is not None]
    timed = overhead[1:]
    errors = [rep["failed"] for rep in reports if "failed" in rep]
    errors += [f"{c['name']}: {e}" for rep in reports for c in rep["clients"] for e in c["errors"]]
    complete = (len(overhead) == rounds and all(r.get("results") == clients for r in rows) and not errors)
    opened = {r["round"]: r["opened"] for r in rows}
    closed = {r["round"]: r["closed"] for r in rows}
    # Where a round's time goes, per client: open -> task in hand (the long poll's wake-up),
    # the download, the upload (until the aggregator's reply is back).
    dispatch, download, upload = [], [], []
    for rep in reports:
        for c in rep["clients"]:
            for r in c["rounds"]:
                n = r["round"]
                if n >= 2 and opened.get(n) is not None:
                    dispatch.append(r["task"] - opened[n])
                    download.append(r["downloaded"] - r["task"])
                    upload.append(r["uploaded"] - r["downloaded"])
    gaps = [opened[n + 1] - closed[n] for n in range(1, rounds) if closed.get(n) and opened.get(n + 1)]
    registered = list(result["registered"].values())
    payload_bytes = 2 * size * clients * rounds
    wire = lo_after - lo_before if lo_before is not None and lo_after is not None else None
    return {
        "transport": transport, "broker_rss_mb": broker_rss,
        "round_results": [{"round": r["round"], "results": r.get("results")} for r in rows],
        "clients": clients, "processes": procs, "threads_per_process": per, "size_bytes": size,
        "size_mb": size / MB, "rounds": rounds, "complete": complete, "errors": errors[:20],
        "round_overhead_s": overhead, "timed_rounds": len(timed),
        "median_round_s": _median(timed), "max_round_s": max(timed) if timed else None,
        "median_throughput_mb_s": _median([2 * size * clients / MB / s for s in timed]),
        "median_dispatch_s": _median(dispatch), "median_download_s": _median(download),
        "median_upload_s": _median(upload),
        "median_between_rounds_s": _median(gaps),
        "quorum_to_round1_s": opened[1] - max(registered) if registered and opened.get(1) else None,
        "payload_bytes": payload_bytes, "loopback_bytes": wire,
        "loopback_over_payload": wire / payload_bytes if wire else None,
        "aggregator_peak_rss_mb": result["peak_rss_mb"],
        "client_process_peak_rss_mb": max(rep["peak_rss_mb"] for rep in reports),
        "heartbeat_breaks": sum(c["heartbeat_breaks"] for rep in reports for c in rep["clients"]),
        "offline_events": result["offline"][:20],
        "torch_imported": result["torch_imported"] or any(rep["torch_imported"] for rep in reports),
        "wall_s": wall,
    }


def dead_client_run(size: int, freeze: bool = False, verbose: bool = False) -> dict:
    """Three one-client processes, quorum two; one hangs in round 2 and is SIGKILLed (or, with
    `freeze`, SIGSTOPped: its connection stays open and silent, as a device that lost power or
    network would leave it, so only the heartbeat timeout can notice it).

    The aggregator starts its rounds only once all three have registered: with a quorum of two,
    round 1 would otherwise open with the first two, and round 2 could open before the third is
    there, leaving one result after the kill, below the quorum (the round would rightly run again,
    and the figure would measure that instead). What is timed is the kill -> the coordinator
    marking the client offline, and the kill -> the round closing with the other two results.
    """
    rounds, timeout = 3, 90.0
    port = free_port()
    with fleet() as children:
        agg = start_aggregator(children, port, 3, 2, size, rounds, timeout + 30, verbose, start_when=3)
        stall = start_clients(children, port, 1, "stall", timeout + 30, stall=True)
        others = [start_clients(children, port, 1, f"live{i}", timeout + 30) for i in range(2)]
        marker = stall.expect("stalling", 60)
        time.sleep(max(0.0, marker["t"] + STALL_KILL_AFTER_S - time.monotonic()))
        killed = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the children's
        if freeze:
            stall.popen.send_signal(signal.SIGSTOP)
        else:
            stall.popen.kill()
            stall.popen.wait(10)
        result, reports = _finish(agg, others, timeout)
        if freeze:
            stall.popen.kill()  # SIGKILL ends a stopped process too
            stall.popen.wait(10)
    n = marker["stalling"]
    row = next(r for r in result["rounds"] if r["round"] == n)
    offline = [e for e in result["offline"] if e["name"] == marker["name"] and e["t"] >= killed]
    errors = [f"{c['name']}: {e}" for rep in reports for c in rep["clients"] for e in c["errors"]]
    return {
        "signal": "SIGSTOP" if freeze else "SIGKILL",
        "stalled_round": n, "signal_after_round_open_s": killed - row["opened"],
        "signal_to_offline_s": offline[0]["t"] - killed if offline else None,
        "offline_why": offline[0]["why"] if offline else None,
        "signal_to_round_closed_s": row["closed"] - killed if row["closed"] is not None else None,
        "round_results": row.get("results"), "round_dropped": row.get("dropped"),
        "run_completed": all(r["closed"] is not None for r in result["rounds"]), "errors": errors,
        "torch_imported": result["torch_imported"] or any(rep["torch_imported"] for rep in reports),
    }


def big_row_plan(mode: str, rows: list[dict], clients: int, procs: int, size: int, rounds: int) -> tuple[bool, str]:
    """Whether the 100 x 22 MB row fits in memory and in BIG_ROW_BUDGET_S, predicted from the
    10 x 22 MB row measured just before in this run.

    Time per round scales with the bytes moved. Memory too: every client downloads, and then
    uploads, at the same moment as the others, so the peaks add up. The per-client peak is the
    reference row's peak RSS above that of the smallest-payload row with the same processes
    (aggregator: per client; client processes: per thread). The machine has no swap to spare,
    so the row needs that estimate + 25 % available.
    """
    if mode == "no":
        return False, "left out (--big no)"
    if mode == "yes":
        return True, "included (--big yes)"
    import psutil

    ref = next((r for r in rows if r["size_bytes"] == size and r["complete"] and r["median_round_s"]), None)
    if ref is None:
        return False, f"left out: no complete {ref_label(size)} row in this run to predict it from"
    base = min((r for r in rows if (r["clients"], r["threads_per_process"]) == (ref["clients"],
                                                                                ref["threads_per_process"])),
               key=lambda r: r["size_bytes"])
    if base is ref:  # no smaller row to subtract: count the runtimes as payload (over-estimates)
        base = {"aggregator_peak_rss_mb": 0.0, "client_process_peak_rss_mb": 0.0}
    threads = max(ref["threads_per_process"])
    per_client_mb = ((ref["aggregator_peak_rss_mb"] - base["aggregator_peak_rss_mb"]) / ref["clients"]
                     + (ref["client_process_peak_rss_mb"] - base["client_process_peak_rss_mb"]) / threads)
    runtimes_mb = base["aggregator_peak_rss_mb"] + procs * base["client_process_peak_rss_mb"]
    need = (clients * per_client_mb + runtimes_mb) * MB
    available = psutil.virtual_memory().available
    predicted = 20 + rounds * ref["median_round_s"] * clients / ref["clients"]
    basis = (f"predicted from the {ref['clients']} x {ref_label(size)} row: {predicted:.0f} s "
             f"(budget {BIG_ROW_BUDGET_S:.0f} s), {need / 2**30:.1f} GiB at peak ({available / 2**30:.1f} GiB "
             "available)")
    if need * 1.25 > available:
        return False, f"left out for memory: {basis}"
    if predicted > BIG_ROW_BUDGET_S:
        return False, f"left out for time: {basis}"
    return True, f"included with {rounds} rounds: {basis}"


def ref_label(size: int) -> str:
    return f"{size / MB:.3g} MB"


@dataclass(frozen=True)
class Plan:
    rows: list[tuple[int, int, int, int]]
    """(clients, processes, size in bytes, rounds)"""
    big: tuple[int, int, int, int] | None
    mqtt_rows: list[tuple[int, int, int, int]]
    """The same kind of rows through a Mosquitto broker."""
    quorum_runs: int
    dead_runs: int
    quorum_clients: tuple[int, int]


def plan(quick: bool) -> Plan:
    small, mid, big = int(0.1 * MB), MB, 22 * MB
    if quick:
        return Plan(rows=[(4, 2, small, 3), (4, 2, mid, 3), (2, 1, big, 2)], big=None,
                    mqtt_rows=[(4, 2, mid, 3)], quorum_runs=1, dead_runs=1, quorum_clients=(4, 2))
    return Plan(rows=[(10, 2, small, 10), (10, 2, mid, 10), (10, 2, big, 5), (100, 4, small, 10), (100, 4, mid, 10)],
                big=(100, 4, big, 3),
                mqtt_rows=[(10, 2, small, 10), (10, 2, mid, 10), (10, 2, big, 5), (100, 4, small, 10),
                           (100, 4, mid, 10)],
                quorum_runs=3, dead_runs=3, quorum_clients=(10, 2))


# --------------------------------------------------------------------------- the report


def _find(rows: list[dict], clients: int, size: int, transport: str = "grpc") -> dict | None:
    return next((r for r in rows if r["clients"] == clients and r["size_bytes"] == size
                 and r["transport"] == transport), None)


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets with the measured figure and pass / fail (n/a when the run lacks the row)."""
    rows, live = result["rows"], result["liveness"]
    out = []

    def add(target: str, measured: str | None, ok: bool | None) -> None:
        out.append({"target": target, "measured": measured or "not measured",
                    "pass": None if ok is None else bool(ok)})

    r = _find(rows, 10, MB)
    med = r["median_round_s"] if r else None
    add(f"10 clients x 1 MB: median round overhead <= {TARGETS['round_overhead_s']} s",
        f"{med:.3f} s" if med is not None else None,
        None if r is None else r["complete"] and med is not None and med <= TARGETS["round_overhead_s"])
    r = _find(rows, 100, MB)
    add("100 clients x 1 MB completes",
        None if r is None else f"{len(r['round_overhead_s'])}/{r['rounds']} rounds, every client every round"
        if r["complete"] else f"incomplete: {'; '.join(r['errors'][:2]) or 'missing results'}",
        None if r is None else r["complete"])
    r, g = _find(rows, 10, MB, "mqtt"), _find(rows, 10, MB)
    med = r["median_round_s"] if r else None
    add("10 clients x 1 MB over MQTT (Mosquitto): median round overhead, beside gRPC's",
        None if med is None else f"{med:.3f} s (gRPC {_fmt(g['median_round_s'] if g else None, '.3f')} s)",
        None if r is None else r["complete"])
    big = [r for r in rows if r["size_bytes"] >= 22 * MB and r["clients"] == 10]
    add("a 22 MB payload goes both ways intact (sha256 checked by the aggregator), 10 clients",
        ", ".join(f"{r['transport']}: {r['rounds']} rounds {'intact' if r['complete'] else 'FAILED'}"
                  for r in big) or None,
        all(r["complete"] for r in big) if big else None)
    dead = live["dead_client"]
    closes = [d["signal_to_round_closed_s"] for d in dead]
    ok = bool(dead) and all(c is not None and c <= TARGETS["dead_client_s"] and d["round_results"] == 2
                            for c, d in zip(closes, dead))
    add(f"dead client noticed within {TARGETS['dead_client_s']:g} s (SIGKILL -> round closed with the other 2)",
        f"max {max(closes):.3f} s over {len(closes)} run(s)" if closes and None not in closes else None,
        ok if dead else None)
    first = [q["quorum_to_round1_s"] for q in live["first_round_after_quorum"]]
    add(f"first round within {TARGETS['first_round_s']:g} s of quorum",
        f"max {max(first) * 1000:.1f} ms over {len(first)} run(s)" if first and None not in first else None,
        all(f is not None and f <= TARGETS["first_round_s"] for f in first) if first else None)
    return out


def _mosquitto_version() -> str:
    from gefl.aggregator.mosquitto import mosquitto_binary

    out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout
    return out.split("\n")[0].replace("mosquitto version", "").strip()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(out_dir: Path, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    live = result["liveness"]
    lines = [
        f"# gRPC and MQTT transports: round overhead without training ({result['date']}, {result['machine']}, "
        f"grpcio {result['grpcio']}, paho-mqtt {result.get('paho_mqtt')}, Python {result['python']})",
        "",
        "Echo rounds through the production Coordinator and gRPC server (benchmarks/transport.py): the aggregator "
        "sends random bytes, every client downloads them and uploads the same bytes back, the aggregator "
        "checks their sha256. No training, no torch in any process. Echo clients are threads with one "
        "client transport and one TCP connection each, in the processes shown. MQTT rows go through a Mosquitto "
        f"{result.get('mosquitto', '')} started for the row (QoS 1, artifacts as retained chunks, so every byte "
        "crosses loopback twice: to the broker and from it). Everything runs on this machine over loopback, in "
        "one run" + (" (--quick smoke run: tiny rows)" if result["quick"] else "") + ".",
        "",
        "Round = the coordinator's round open -> round close; median and max over rounds 2.. (round 1 warms the "
        "connections up). Throughput = payload both ways (2 x size x clients) / round. Wire = the loopback "
        "interface's bytes_sent over the whole row (start-up, registration, heartbeats and every round), beside "
        "the payload bytes of all rounds; the counters include everything else on loopback at the time. "
        "MB = 2**20 bytes.",
        "",
        "| transport | clients | processes x threads | payload MB | rounds (timed) | median round s | max round s "
        "| median MB/s | payload MB | wire MB | wire / payload | aggregator peak RSS MB | broker peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        threads = "+".join(str(t) for t in r["threads_per_process"])
        wire = r["loopback_bytes"]
        lines.append(
            f"| {r['transport']} | {r['clients']} | {threads} | {r['size_mb']:.3g} | "
            f"{r['rounds']} ({r['timed_rounds']}) | "
            f"{_fmt(r['median_round_s'], '.3f')} | {_fmt(r['max_round_s'], '.3f')} | "
            f"{_fmt(r['median_throughput_mb_s'], ',.0f')} | {r['payload_bytes'] / MB:,.1f} | "
            f"{_fmt(wire / MB if wire is not None else None, ',.1f')} | {_fmt(r['loopback_over_payload'], '.3f')} | "
            f"{r['aggregator_peak_rss_mb']:,.0f} | {_fmt(r.get('broker_rss_mb'), ',.0f')} |"
            + ("" if r["complete"] else " **incomplete**"))
    lines += ["", f"100 clients x 22 MB: {result['big_row']}.", ""]
    for r in result["rows"]:
        if not r["complete"] and r.get("offline_events"):
            late = sorted({e["name"] for e in r["offline_events"]})
            lines += [f"{r['clients']} clients x {r['size_mb']:.3g} MB is incomplete, not corrupt: {len(late)} clients "
                      f"were counted offline ({r['offline_events'][0]['why'].split(';')[0]}) while {r['clients']} "
                      f"transfers of {r['size_mb']:.3g} MB each shared 2 cores, and their rounds went on without them; "
                      "every upload the aggregator did accept had the right sha256. This is beyond the issue's "
                      "targets (100 x 1 MB); an aggregator for such a fleet needs more cores or a longer "
                      "network.heartbeat_timeout (`--scale` runs it with heartbeats every "
                      f"{SCALE_LIVENESS[0]:g} s and a {SCALE_LIVENESS[1]:g} s timeout: transport_scale.md).", ""]
    lines += [
              "Where a round goes (medians over rounds 2.. and clients, seconds): dispatch = round open -> the "
              "client has its task (long poll wake-up); upload ends when the aggregator's reply is back; between "
              "rounds = one round's close -> the next one's open.", "",
              "| transport | clients | payload MB | dispatch | download | upload | between rounds |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['transport']} | {r['clients']} | {r['size_mb']:.3g} | "
                     f"{_fmt(r['median_dispatch_s'], '.3f')} | "
                     f"{_fmt(r['median_download_s'], '.3f')} | {_fmt(r['median_upload_s'], '.3f')} | "
                     f"{_fmt(r['median_between_rounds_s'], '.3f')} |")
    first = live["first_round_after_quorum"]
    qc = first[0]["clients"] if first else 0

    def seconds(runs: list[dict], key: str) -> str:
        return ", ".join(_fmt(d[key], ".3f") + " s" for d in runs) or "-"

    def why(runs: list[dict]) -> str:
        reasons = sorted({d["offline_why"].split(";")[0] for d in runs if d["offline_why"]})
        return f" (offline because: {'; '.join(reasons)})" if reasons else ""

    dead, frozen = live["dead_client"], live["frozen_client"]
    lines += [
        "",
        "Liveness, each in its own small runs (times per run):",
        f"- first round after quorum ({qc} clients, quorum {qc}): last registration -> round 1 opens: "
        + (", ".join(_fmt(q["quorum_to_round1_s"] * 1000, ".1f") + " ms" for q in first) or "-") + ".",
        "- dead client: 3 one-client processes, quorum 2, all registered before round 1; one takes its round-2 task, "
        f"hangs with its heartbeat going and is SIGKILLed {STALL_KILL_AFTER_S:g} s later (the kernel closes its "
        f"connection). Kill -> marked offline: {seconds(dead, 'signal_to_offline_s')}; kill -> round closed with "
        f"the other 2: {seconds(dead, 'signal_to_round_closed_s')}{why(dead)}.",
        "- frozen client (not a target; the case of a device that loses power or network, where no connection "
        "is closed): the same, but SIGSTOP instead of SIGKILL, so only the heartbeat timeout "
        f"({HEARTBEAT_TIMEOUT_S:g} s, heartbeats every {HEARTBEAT_INTERVAL_S:g} s) can notice. SIGSTOP -> marked "
        f"offline: {seconds(frozen, 'signal_to_offline_s')}; SIGSTOP -> round closed: "
        f"{seconds(frozen, 'signal_to_round_closed_s')}{why(frozen)}.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        verdict = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "**FAIL**")
        lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    (out_dir / "transport.md").write_text("\n".join(lines) + "\n")
    return out_dir / "transport.md"


# --------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace) -> dict:
    p = plan(args.quick)
    rows: list[dict] = []

    def row(clients: int, procs: int, size: int, rounds: int, transport: str = "grpc") -> dict:
        progress(f"{transport}: {clients} clients ({procs} process{'es' if procs > 1 else ''}) x {ref_label(size)} x "
                 f"{rounds} rounds ...")
        r = echo_row(clients, procs, size, rounds, args.verbose, transport)
        state = "complete" if r["complete"] else f"INCOMPLETE ({'; '.join(r['errors'][:2]) or 'missing results'})"
        progress(f"  median round {_fmt(r['median_round_s'], '.3f')} s, max {_fmt(r['max_round_s'], '.3f')} s, "
                 f"{_fmt(r['median_throughput_mb_s'], ',.0f')} MB/s, wire/payload "
                 f"{_fmt(r['loopback_over_payload'], '.3f')}, aggregator {r['aggregator_peak_rss_mb']:,.0f} MB; "
                 f"{state}; {r['wall_s']:.1f} s")
        return r

    for spec in p.rows:
        rows.append(row(*spec))
    big_note = "not part of --quick" if args.quick else "not planned"
    if p.big is not None:
        include, big_note = big_row_plan(args.big, rows, *p.big)
        progress(f"100 clients x 22 MB: {big_note}")
        if include:
            rows.append(row(*p.big))
    for spec in p.mqtt_rows:
        rows.append(row(*spec, transport="mqtt"))

    first = []
    for i in range(p.quorum_runs):
        clients, procs = p.quorum_clients
        progress(f"first round after quorum, run {i + 1}/{p.quorum_runs} ({clients} clients) ...")
        r = echo_row(clients, procs, int(0.1 * MB), 2, args.verbose)
        first.append({"clients": clients, "quorum_to_round1_s": r["quorum_to_round1_s"], "complete": r["complete"],
                      "torch_imported": r["torch_imported"]})
        ms = r["quorum_to_round1_s"] * 1000 if r["quorum_to_round1_s"] is not None else None
        progress(f"  last registration -> round 1: {_fmt(ms, '.1f')} ms")
    dead: dict[bool, list[dict]] = {False: [], True: []}
    for freeze in (False, True):
        what = "frozen (SIGSTOP)" if freeze else "dead (SIGKILL)"
        for i in range(p.dead_runs):
            progress(f"{what} client, run {i + 1}/{p.dead_runs} ...")
            d = dead_client_run(int(0.1 * MB), freeze, args.verbose)
            dead[freeze].append(d)
            progress(f"  {d['signal']} -> offline {_fmt(d['signal_to_offline_s'], '.3f')} s ({d['offline_why']}), "
                     f"-> round {d['stalled_round']} closed {_fmt(d['signal_to_round_closed_s'], '.3f')} s with "
                     f"{d['round_results']} results")

    torch_anywhere = ("torch" in sys.modules or any(r["torch_imported"] for r in rows)
                      or any(q["torch_imported"] for q in first)
                      or any(d["torch_imported"] for runs in dead.values() for d in runs))
    if torch_anywhere:
        raise RuntimeError("torch was imported by a benchmark process: the transport path must stay torch-free")
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "cores": os.cpu_count(), "python": platform.python_version(), "grpcio": importlib.metadata.version("grpcio"),
        "paho_mqtt": importlib.metadata.version("paho-mqtt"), "mosquitto": _mosquitto_version(),
        "quick": args.quick, "mb": MB, "torch_imported": False,
        "settings": {"round_timeout_s": ROUND_TIMEOUT_S, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                     "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "poll_s": POLL_S,
                     "stall_kill_after_s": STALL_KILL_AFTER_S, "big_row_budget_s": BIG_ROW_BUDGET_S},
        "rows": rows, "big_row": big_note,
        "liveness": {"first_round_after_quorum": first, "dead_client": dead[False], "frozen_client": dead[True]},
    }
    result["targets"] = evaluate_targets(result)
    return result


SCALE_LIVENESS = (10.0, 60.0)
"""Heartbeat interval and timeout for the rows at scale. At 1 s, 1000 heartbeats a second would take
the aggregator's 2 cores from the rounds; with 100 x 22 MB in flight, the 2 cores are saturated for
seconds at a time, and a 3 s timeout counted clients offline that were only waiting for a core."""

SCALE_ROWS = [("grpc", 1000, 8, int(0.1 * MB), 5), ("mqtt", 1000, 8, int(0.1 * MB), 5),
              ("grpc", 100, 4, 22 * MB, 3), ("mqtt", 100, 4, 22 * MB, 3)]
"""(transport, clients, processes, bytes each way, rounds)"""


def scale_rows(out: Path, verbose: bool) -> int:
    """The rows at scale (SCALE_ROWS); a row that fails is written down as such."""
    rows = []
    for transport, clients, procs, size, rounds in SCALE_ROWS:
        progress(f"{transport}: {clients} clients ({procs} processes) x {ref_label(size)} x {rounds} rounds ...")
        try:
            r = echo_row(clients, procs, size, rounds, verbose, transport, liveness=SCALE_LIVENESS)
        except RuntimeError as exc:  # a child that never reported: the row did not finish
            r = {"transport": transport, "clients": clients, "size_bytes": size, "rounds": rounds,
                 "complete": False, "errors": [str(exc)]}
        progress(f"  {json.dumps({k: r.get(k) for k in ('complete', 'median_round_s', 'errors')})}")
        rows.append(r)
    result = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "heartbeat_interval_s": SCALE_LIVENESS[0],
              "heartbeat_timeout_s": SCALE_LIVENESS[1], "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Echo rounds at scale ({result['date']}, {result['cores']} cores)", "",
             "Echo clients in several processes, the payload each way, heartbeats every "
             f"{SCALE_LIVENESS[0]:g} s (timeout {SCALE_LIVENESS[1]:g} s); median over rounds 2 on. Flower on this "
             "machine: 10 to 17 s per round for 10 clients x 1 MB.", "",
             "| transport | clients | payload | rounds | complete | results per round | median round s | max round s "
             "| aggregator peak RSS MB | broker RSS MB | client process peak RSS MB | clients counted offline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_round = [x.get("results") for x in r.get("round_results", [])] or "-"
        lines.append(f"| {r['transport']} | {r['clients']} | {ref_label(r['size_bytes'])} | {r['rounds']} "
                     f"| {'yes' if r['complete'] else 'no'} | {per_round} "
                     f"| {_fmt(r.get('median_round_s'), '.2f')} | {_fmt(r.get('max_round_s'), '.2f')} "
                     f"| {_fmt(r.get('aggregator_peak_rss_mb'), '.0f')} | {_fmt(r.get('broker_rss_mb'), '.0f')} "
                     f"| {_fmt(r.get('client_process_peak_rss_mb'), '.0f')} | {len(r.get('offline_events', []))} "
                     f"| {'; '.join(r['errors'][:1])} |")
    (out / "transport_scale.md").write_text("\n".join(lines) + "\n")
    print((out / "transport_scale.md").read_text())
    return 0 if all(r["complete"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny rows, a smoke check (default --out: a temp dir)")
    parser.add_argument("--out", default=None, help=f"results directory (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--big", choices=("auto", "yes", "no"), default="auto",
                        help="the 100 clients x 22 MB row: auto = only if predicted to fit in time and memory")
    parser.add_argument("--verbose", action="store_true", help="echo the aggregator's log to stderr")
    parser.add_argument("--scale", action="store_true",
                        help="only the rows at scale (1000 x 0.1 MB and 100 x 22 MB, gRPC and MQTT, heartbeats "
                             f"every {SCALE_LIVENESS[0]:g} s, timeout {SCALE_LIVENESS[1]:g} s): "
                             "transport_scale.json/.md")
    # Internal: the roles of the child processes this script starts.
    parser.add_argument("--role", choices=("aggregator", "clients"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--min-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="p", help=argparse.SUPPRESS)
    parser.add_argument("--stall", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-when", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=900.0, help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=("grpc", "mqtt"), default="grpc", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role is not None:
        # Ctrl-C reaches the whole process group: the parent alone handles it, stopping its
        # children in order, instead of every child printing its own KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where a stuck child is
        _watchdog(args.deadline)
        role: Callable[[argparse.Namespace], int] = run_aggregator if args.role == "aggregator" else run_clients
        return role(args)

    # SIGTERM (a CI job cancelled, `kill`) should stop the children as Ctrl-C does: SystemExit
    # unwinds through every fleet's finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "gefl-transport-quick" if args.quick
                                           else RESULTS)
    started = time.monotonic()
    if args.scale:
        return scale_rows(out, args.verbose)
    result = run_benchmark(args)
    result["wall_s"] = time.monotonic() - started
    md = write_results(out, result)
    progress(f"done in {result['wall_s']:.0f} s; wrote {out / 'transport.json'} and {md}")
    print(md.read_text())
    return 0 if all(t["pass"] is not False for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
