"""`gefl aggregator serve`: a federation's aggregator as a long-running service, over gRPC, MQTT or both.

The state directory is the run directory (`gefl simulate`'s layout) plus the checkpoint the
coordinator rewrites after every round; started again on the same directory, the aggregator
resumes where it stopped. Given no token (--token-file or $GEFL_TOKEN), it makes an enrolment token
once and keeps it in the state directory (readable by its owner only), and says where: there is no
way to run without one. Plaintext off loopback takes an explicit `insecure`.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from gefl.aggregator.coordinator import Coordinator, Settings
from gefl.aggregator.grpc_server import SERVICE, TlsFiles, start_server

from gefl.algorithms import make_algorithm
from gefl.config import Config
from gefl.data import evaluation_split, load_dataset
from gefl.errors import GeflError
from gefl.protocol import check_plaintext
from gefl.protocol.mqtt import BrokerUrl, MqttAuth
from gefl.rounds.checkpoint import CHECKPOINT
from gefl.rounds.loop import RoundLoop, observers_for
from gefl.rounds.rundir import RunDir
from gefl.rounds.training_logic import TrainingLogic
from gefl.simulation.device_sim import DeviceSimulation
from gefl.simulation.executor import LocalExecutor, WorkerContext

log = logging.getLogger(__name__)

TOKEN_FILE = "enrolment-token"


def settings_for(cfg: Config) -> Settings:
    net = cfg.network
    return Settings(num_clients=cfg.num_clients, min_clients=net.min_clients or cfg.num_clients,
                    round_timeout=net.round_timeout, heartbeat_interval=net.heartbeat_interval,
                    heartbeat_timeout=net.heartbeat_timeout, client_fraction=cfg.client_fraction, seed=cfg.seed,
                    eval_every=cfg.eval.every)


def enrolment_token(state_dir: Path, given: str | None) -> str:
    path = state_dir / TOKEN_FILE
    if given:
        return given
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    # The token itself stays out of the log (logs are read by more people than the state directory).
    log.info(f"enrolment token written to {path} (readable by its owner only): give it to the clients in "
        "GEFL_TOKEN or a --token-file")
    return token


def build_coordinator(cfg: Config, state_dir: Path, token: str | None,
                      devices: DeviceSimulation | None = None) -> Coordinator:
    """The coordinator of a training federation on `state_dir` and the round loop that drives it,
    resumed from its checkpoint if it has one. `devices`: a simulated device clock (`gefl simulate
    --devices --transport ...`), never on a real federation's aggregator."""
    run = RunDir.resume_or_create(state_dir, cfg)
    dataset = load_dataset(cfg.dataset, cfg.data_dir)  # what the global models are evaluated on
    extras = {"transport": "network"}
    algorithm = make_algorithm(cfg)
    evaluator = LocalExecutor(WorkerContext(algorithm, {}, evaluation_split(cfg, dataset), dataset.num_classes,
                                            cfg.eval.batch_size))
    logic = TrainingLogic(cfg, dataset, run, evaluator=evaluator, algorithm=algorithm, extras=lambda: {
        **extras, **({"devices": devices.summary()} if devices is not None else {})})
    settings = settings_for(cfg)
    coordinator = Coordinator(logic, settings, enrolment_token(run.path, token))
    coordinator.loop = RoundLoop(logic, coordinator, num_clients=cfg.num_clients, quorum=settings.min_clients,
                                 client_fraction=cfg.client_fraction, seed=cfg.seed, eval_every=cfg.eval.every,
                                 checkpoint_path=run.path / CHECKPOINT, devices=devices,
                                 train_epochs=cfg.train.local_epochs, generator_epochs=cfg.gefl.generator.local_epochs,
                                 observers=observers_for(cfg))
    coordinator.on_registry_change = coordinator.loop.save_checkpoint
    return coordinator


@dataclass(frozen=True)
class MqttEndpoint:
    url: BrokerUrl
    auth: MqttAuth


def serve(cfg: Config, state_dir: str | Path, *, listen: str | None = None, tls: TlsFiles | None = None,
          mqtt: MqttEndpoint | None = None, token: str | None = None, status: str | None = None,
          status_token: str | None = None,
          insecure: bool = False) -> int:
    """Serve over gRPC on `listen`, over MQTT through `mqtt`'s broker, or both at once (one federation),
    until every round is done (or SIGTERM / Ctrl-C); returns the rounds completed."""
    if listen is None and mqtt is None:
        raise GeflError("nothing to serve on: give a gRPC address (--listen) and/or a broker (--mqtt)")
    if listen is not None and tls is None:
        check_plaintext(listen.rsplit(":", 1)[0], "serving gRPC", insecure)
    if mqtt is not None and not mqtt.url.tls:
        check_plaintext(mqtt.url.host, "MQTT (mqtt://)", insecure)
    coordinator = build_coordinator(cfg, Path(state_dir), token)
    server = health = bridge = page = None
    faces = []
    try:
        if listen is not None:
            server, port, health = start_server(coordinator, listen, tls)
            faces.append(f"gRPC on {listen.rsplit(':', 1)[0]}:{port} "
                         f"({'mutual TLS' if tls and tls.client_ca else 'TLS' if tls else 'no TLS'})")
        if mqtt is not None:
            from gefl.aggregator.mqtt_bridge import MqttBridge

            bridge = MqttBridge(coordinator, mqtt.url, mqtt.auth)
            bridge.start()
            faces.append(f"MQTT via {bridge.url} ({'TLS' if mqtt.url.tls else 'no TLS'}; clients use "
                         f"--aggregator {bridge.url})")
        if status is not None:
            from gefl.aggregator.status import StatusServer

            page = StatusServer(coordinator, status, status_token, Path(state_dir) / "metrics.jsonl").start()
            faces.append(f"a status page on {page.url}")
        log.info(f"gefl aggregator: {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} clients (quorum "
            f"{coordinator.quorum}), {coordinator.federation.total_rounds} rounds; serving {' and '.join(faces)}; "
            f"state in {state_dir}")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: coordinator.stopping.set())
        try:
            coordinator.run()
        except KeyboardInterrupt:
            coordinator.stopping.set()
            raise
    finally:
        if health is not None:
            from grpc_health.v1 import health_pb2

            for service in ("", SERVICE):
                health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if bridge is not None:
            bridge.stop()
        if page is not None:
            page.stop()
        if server is not None:
            server.stop(grace=1.0).wait()
    if not coordinator.federation.finished:
        raise GeflError(f"stopped after round {coordinator.federation.completed}; start again with the same "
                        f"--state-dir {state_dir} to resume")
    return coordinator.federation.completed
