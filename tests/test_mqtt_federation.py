"""Federations over MQTT with real processes and a real Mosquitto: `gefl simulate --transport mqtt`
against the in-process run, and one aggregator serving gRPC and MQTT clients together while its
broker is killed and restarted mid-run."""

from __future__ import annotations

import pytest
from gefl.aggregator.local_federation import simulate_over_network
from gefl.aggregator.mosquitto import Mosquitto

from gefl import simulate
from gefl.config import config_from_dict
from gefl.image_folder import write_split

from netutil import SHORT, TOKEN, Process, free_port, read_metrics, wait_for


def test_simulate_over_mqtt_computes_what_the_in_process_simulation_computes(tmp_path):
    local = simulate(SHORT, out=tmp_path / "local")
    remote = simulate_over_network(config_from_dict(SHORT), "mqtt", out=tmp_path / "mqtt")
    losses = [m["loss"] for m in read_metrics(tmp_path / "local")]
    assert [m["loss"] for m in read_metrics(tmp_path / "mqtt")] == pytest.approx(losses, rel=1e-5)
    # No client was taken for dead while it started up (it imports torch meanwhile): no round ran again.
    assert [(m["round"], m["dropped"]) for m in read_metrics(tmp_path / "mqtt")] == [(r, []) for r in (1, 2, 3, 4)]
    best = {t: s["best_acc"] for t, s in local["tiers"].items()}
    assert {t: s["best_acc"] for t, s in remote["tiers"].items()} == best
    assert remote["bytes_per_client_per_round"] == local["bytes_per_client_per_round"]


def test_grpc_and_mqtt_clients_share_a_federation_through_a_broker_restart(tmp_path):
    shards = tmp_path / "shards"
    write_split("fashion-mnist", 4, shards, samples_per_client=300, seed=0)
    rounds = 10
    config = tmp_path / "config.yaml"
    config.write_text(f"name: mixed\nalgorithm: fedavg\nnum_clients: 4\ntiers: [cnn2, cnn3]\nrounds: {rounds}\n"
                      "train: {local_epochs: 3}\neval: {every: 100}\n"
                      # The broker is away for ~2 s: clients are not counted offline meanwhile, so
                      # every round must count every client's result, exactly once.
                      "network: {round_timeout: 120, heartbeat_timeout: 30}\n")
    state, port = tmp_path / "state", free_port()
    broker = Mosquitto().start()
    aggregator = Process(["aggregator", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                          "--mqtt", broker.url, "--state-dir", str(state)],
                         env={"GEFL_TOKEN": TOKEN})
    addresses = [f"127.0.0.1:{port}", broker.url, f"127.0.0.1:{port}", broker.url]
    clients = [Process(["client", "run", "--aggregator", address, "--data-dir", str(shards / f"client-00{i}"),
                        "--tier", ["cnn2", "cnn3"][i % 2], "--name", f"board-{i}", "--threads", "1",
                        "--give-up", "120"], env={"GEFL_TOKEN": TOKEN}) for i, address in enumerate(addresses)]
    try:
        wait_for(lambda: len(read_metrics(state)) >= 3, 180, "three rounds")
        broker.kill()
        killed_after = len(read_metrics(state))
        wait_for(lambda: all("lost the connection" in c.output for c in clients[1::2]), 30,
                 "the MQTT clients to notice")
        broker.start()  # same port, empty: no sessions, no retained messages
        assert aggregator.wait(240) == 0, aggregator.output
        for client in clients:
            assert client.wait(60) == 0, client.output
            assert "the run is finished" in client.output
    finally:
        for process in (aggregator, *clients):
            process.kill()
        broker.close()
    assert killed_after < rounds  # the broker really went away mid-run
    assert "mqtt: reconnected" in aggregator.output
    names = {line.split("registered: ")[1].split(",")[0]: int(line.split("client ")[1].split(" ")[0])
             for line in aggregator.output.splitlines() if " registered: board-" in line}
    assert sorted(names) == [f"board-{i}" for i in range(4)]
    records = read_metrics(state)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))  # every round once
    for r in records:  # gRPC and MQTT clients in every round, each result counted once
        assert r["contributors"] == sorted(names.values()) and r["dropped"] == [], r
