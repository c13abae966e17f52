"""Networked federations with real processes on loopback: `gefl client run` clients that are
killed, frozen and restarted, an aggregator killed with SIGKILL and resumed, and the grpc
simulation against the in-process one."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from gefl.aggregator.grpc_server import start_server
from gefl.aggregator.serve import build_coordinator

from gefl import simulate
from gefl.config import config_from_dict
from gefl.image_folder import write_split
from gefl.protocol.wire import arrays_digest, decode_arrays

from netutil import SHORT, TOKEN, LogLines, Process, fast_slow_mix, free_port, read_metrics, wait_for


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "clients"
    write_split("fashion-mnist", 3, out, samples_per_client=600, seed=0)
    return out


def _client(address: str, data: Path, name: str, tier: str = "cnn2", token: str = TOKEN) -> Process:
    return Process(["client", "run", "--aggregator", address, "--data-dir", str(data), "--tier", tier,
                    "--name", name, "--threads", "1", "--give-up", "60"], env={"GEFL_TOKEN": token})


def test_simulate_over_grpc_computes_what_the_in_process_simulation_computes(tmp_path):
    local = simulate(SHORT, out=tmp_path / "local")
    from gefl.aggregator.local_federation import simulate_over_network

    remote = simulate_over_network(config_from_dict(SHORT), "grpc", out=tmp_path / "grpc")
    assert abs(remote["mean_best_acc"] - local["mean_best_acc"]) <= 0.5
    # Same ids, shards, seeds and summation order: the rounds are the same computation.
    losses = [m["loss"] for m in read_metrics(tmp_path / "local")]
    assert [m["loss"] for m in read_metrics(tmp_path / "grpc")] == pytest.approx(losses, rel=1e-5)
    # No client was taken for dead while it started up (it imports torch meanwhile): no round ran again.
    assert [(m["round"], m["dropped"]) for m in read_metrics(tmp_path / "grpc")] == [(r, []) for r in (1, 2, 3, 4)]
    best = {t: s["best_acc"] for t, s in local["tiers"].items()}
    assert {t: s["best_acc"] for t, s in remote["tiers"].items()} == best
    assert remote["bytes_per_client_per_round"] == local["bytes_per_client_per_round"]
    # The networked run's report: every figure, the participation grid of its clients among them.
    from gefl.report import write_report

    index = write_report(tmp_path / "grpc")
    html = index.read_text()
    for figure in ("accuracy", "loss", "bytes", "participation", "samples"):
        png = index.parent / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{figure}.png"' in html, figure


def test_the_simulated_device_clock_drops_the_same_stragglers_over_grpc(tmp_path):
    """The device clock is the round loop's, not the in-process grid's: a device mix over gRPC picks the
    same tiers, drops the same late results and computes the same rounds as in-process."""
    mix = fast_slow_mix(tmp_path / "mix.yaml")
    cfg = {**SHORT, "algorithm": "fedavg", "tiers": ["cnn2", "cnn3"], "rounds": 2, "devices": str(mix)}
    local = simulate(cfg, out=tmp_path / "local")
    from gefl.aggregator.local_federation import simulate_over_network

    remote = simulate_over_network(config_from_dict(cfg), "grpc", out=tmp_path / "grpc")
    fields = ("round", "participants", "stragglers", "contributors", "simulated_s")
    records = [{k: m.get(k) for k in fields} for m in read_metrics(tmp_path / "local")]
    assert any(r["stragglers"] for r in records), records  # the slow device really missed the deadline
    assert [{k: m.get(k) for k in fields} for m in read_metrics(tmp_path / "grpc")] == records
    losses = [m["loss"] for m in read_metrics(tmp_path / "local")]
    assert [m["loss"] for m in read_metrics(tmp_path / "grpc")] == pytest.approx(losses, rel=1e-5)
    assert remote["devices"]["device_classes"] == local["devices"]["device_classes"]
    assert [c["num_samples"] for c in json.loads((tmp_path / "grpc" / "partition.json").read_text())] == [200] * 3


def test_dead_and_frozen_clients_never_stall_a_round_and_come_back(tmp_path, shards):
    cfg = config_from_dict({"algorithm": "fedavg", "num_clients": 3, "tiers": ["cnn2"], "rounds": 40,
                            "train": {"local_epochs": 5}, "eval": {"every": 100},
                            # A short silence timeout: the frozen client below is noticed by it alone.
                            "network": {"min_clients": 1, "round_timeout": 60, "heartbeat_interval": 0.5,
                                        "heartbeat_timeout": 3}})
    log = LogLines(timed=True)
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    driver = threading.Thread(target=coordinator.run, daemon=True)
    address = f"127.0.0.1:{port}"
    clients = [_client(address, shards / f"client-00{i}", f"board-{i}") for i in range(3)]
    try:
        wait_for(lambda: len(coordinator.clients) == 3, 60, "three registrations")
        driver.start()
        ids = {c.name: c.client_id for c in coordinator.clients.values()}  # in order of registration
        dead, frozen = ids["board-2"], ids["board-1"]

        def round_open(n: int) -> bool:
            return n in coordinator.round_started

        # kill -9 client 2 as round 2 opens: the round closes on the other two, within seconds.
        wait_for(lambda: round_open(2), 60, "round 2")
        killed_at = time.monotonic()
        clients[2].proc.send_signal(signal.SIGKILL)
        wait_for(lambda: 2 in coordinator.round_closed, 60, "round 2 to close without the dead client")
        wait_for(lambda: len(read_metrics(tmp_path / "state")) >= 2, 30, "round 2's metrics")
        assert read_metrics(tmp_path / "state")[1]["dropped"] == [dead]
        # Noticed because its connection closed (the kernel closes a killed process's sockets), at once,
        # not by the silence timeout.
        assert any(f"client {dead} (board-2) is offline: its heartbeat stream closed" in m for _, m in log)
        noticed = next(t for t, m in log if f"client {dead} (board-2) is offline" in m) - killed_at
        print(f"killed client counted offline {noticed:.3f} s after SIGKILL")

        # Restarted under the same name, it gets its id back and trains again in a later round.
        clients[2] = _client(address, shards / "client-002", "board-2")
        wait_for(lambda: any(dead in m["contributors"] for m in read_metrics(tmp_path / "state")[2:]), 90,
                 "the restarted client to contribute")
        assert len(coordinator.clients) == 3

        # Freeze client 1 (SIGSTOP: its connection stays open, its heartbeats stop) while it trains a round.
        frozen_round = max(coordinator.round_started) + 1
        wait_for(lambda: round_open(frozen_round), 60, f"round {frozen_round}")
        time.sleep(0.3)  # it has its task by now and trains for a second or more
        clients[1].proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: frozen_round in coordinator.round_closed, 60, "the round to close without the frozen client")
        print(f"frozen client's round closed {coordinator.round_closed[frozen_round] - stopped_at:.1f} s after SIGSTOP")
        wait_for(lambda: len(read_metrics(tmp_path / "state")) >= frozen_round, 30, f"round {frozen_round}'s metrics")
        record = next(m for m in read_metrics(tmp_path / "state") if m["round"] == frozen_round)
        assert record["dropped"] == [frozen]
        assert any(f"client {frozen} (board-1) is offline: no heartbeat" in m for _, m in log)

        # Thawed, it finishes training and uploads for a round that has closed: refused by round id.
        clients[1].proc.send_signal(signal.SIGCONT)
        clients[1].wait_line(f"round {frozen_round}: result not counted", 30)
        assert any(f"round {frozen_round}: upload from client {frozen}" in m and "too late" in m for _, m in log)
        wait_for(lambda: any(frozen in m["contributors"] for m in read_metrics(tmp_path / "state")
                             if m["round"] > frozen_round), 60, "the thawed client to contribute again")
    finally:
        coordinator.stopping.set()
        driver.join(10)
        server.stop(grace=None).wait()
        for c in clients:
            c.kill()


def test_aggregator_killed_with_sigkill_resumes_with_the_same_weights_and_loses_nothing(tmp_path, shards):
    port = free_port()
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text("algorithm: fedavg\nnum_clients: 2\ntiers: [cnn2, cnn3]\nrounds: 8\n"
                      "train: {local_epochs: 1}\neval: {every: 2}\nnetwork: {round_timeout: 60}\n")
    serve = ["aggregator", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--state-dir",
             str(state)]
    aggregator = Process(serve, env={"GEFL_TOKEN": TOKEN})
    address = f"127.0.0.1:{port}"
    clients = [_client(address, shards / f"client-00{i}", f"board-{i}", tier) for i, tier in
               enumerate(["cnn2", "cnn3"])]
    restarted = None
    try:
        wait_for(lambda: len(read_metrics(state)) >= 3, 120, "three rounds")
        aggregator.proc.send_signal(signal.SIGKILL)
        aggregator.wait(10)
        checkpoint = decode_arrays((state / "checkpoint.safetensors").read_bytes())
        digest = arrays_digest(checkpoint)
        from safetensors import safe_open

        with safe_open(state / "checkpoint.safetensors", "np") as f:
            completed = json.loads(f.metadata()["gefl"])["completed"]
        # The kill may land between a round's metrics line and its checkpoint: the resumed run then
        # drops that line and runs the round again.
        assert completed >= 2

        time.sleep(1.0)  # the clients notice and back off
        restarted = Process(serve, env={"GEFL_TOKEN": TOKEN})
        line = restarted.wait_line("resuming after round", 60)
        assert f"resuming after round {completed} of 8" in line
        assert digest in line  # the global weights are exactly those checkpointed before the kill
        assert restarted.wait(180) == 0, restarted.output
        for client in clients:
            assert client.wait(60) == 0, client.output
            assert "the run is finished" in client.output
        rounds = [m["round"] for m in read_metrics(state)]
        assert rounds == list(range(1, 9))  # every round once: none lost, none counted twice
        assert all(len(m["contributors"]) == 2 for m in read_metrics(state))
        summary = json.loads((state / "summary.json").read_text())
        assert summary["rounds"] == 8 and set(summary["tiers"]) == {"cnn2", "cnn3"}
        assert summary["mean_best_acc"] > 50
        assert (state / "weights" / "cnn3.safetensors").is_file()
    finally:
        for p in [aggregator, restarted, *clients]:
            if p is not None:
                p.kill()


def test_client_with_a_wrong_token_stops_with_a_clear_error(tmp_path, shards):
    cfg = config_from_dict({"algorithm": "fedavg", "num_clients": 1, "tiers": ["cnn2"], "rounds": 1})
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    try:
        client = _client(f"127.0.0.1:{port}", shards / "client-000", "intruder", token="wrong")
        assert client.wait(60) == 2
        assert "wrong or missing enrolment token" in client.output
        assert not coordinator.clients
    finally:
        server.stop(grace=None).wait()
    missing = Process(["client", "run", "--aggregator", "127.0.0.1:1", "--data-dir", str(shards / "client-000")],
                      env={"GEFL_TOKEN": ""})
    assert missing.wait(30) == 2 and "enrolment token is needed" in missing.output


def test_a_client_whose_result_is_refused_does_not_retrain_the_round_in_a_loop(tmp_path, shards):
    """A diverged client (NaN loss) is refused; training the same task again gives the same NaN, so it
    must wait for another round instead of retraining and uploading in a tight loop."""
    cfg = config_from_dict({"algorithm": "fedavg", "num_clients": 1, "tiers": ["cnn2"], "rounds": 2,
                            "train": {"lr": 1e12, "local_epochs": 1}, "eval": {"every": 100},
                            "network": {"min_clients": 1, "round_timeout": 3}})
    log = LogLines()
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    driver = threading.Thread(target=coordinator.run, daemon=True)
    client = _client(f"127.0.0.1:{port}", shards / "client-000", "diverged")
    try:
        driver.start()
        client.wait_line("result not counted", 120)
        # Round 1 gets no result and runs again, several times, while the client sits it out.
        wait_for(lambda: sum("result(s) by the deadline" in m for m in log) >= 4, 120, "four reruns of round 1")
    finally:
        coordinator.stopping.set()
        driver.join(10)
        server.stop(grace=None).wait()
        client.kill()
    refusals = [m for m in log if "refused" in m and "upload from client" in m]
    assert len(refusals) == 1 and "NaN" in refusals[0], refusals


def test_a_board_shares_its_label_counts_only_when_its_user_opts_in(tmp_path, shards):
    cfg = config_from_dict({"algorithm": "fedavg", "num_clients": 2, "tiers": ["cnn2"], "rounds": 1,
                            "train": {"local_epochs": 1}, "eval": {"every": 100}})
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    private = _client(address, shards / "client-000", "private")
    shared = Process(["client", "run", "--aggregator", address, "--data-dir", str(shards / "client-001"), "--tier",
                      "cnn2", "--name", "shared", "--threads", "1", "--give-up", "60", "--share-label-histogram"],
                     env={"GEFL_TOKEN": TOKEN})
    try:
        wait_for(lambda: len(coordinator.clients) == 2, 120, "two registrations")
        by_name = {c.name: c for c in coordinator.clients.values()}
        assert by_name["private"].label_histogram == []
        assert sum(by_name["shared"].label_histogram) == by_name["shared"].num_samples == 600
    finally:
        server.stop(grace=None).wait()
        for c in (private, shared):
            c.kill()
