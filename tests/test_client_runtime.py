"""The client runtime across an aggregator that is replaced under the same address: it registers
again and trains the new federation's config, not the one it first registered for; and it reads its
image folder once, however often it registers."""

from __future__ import annotations

import logging
import threading
from unittest import mock

from gefl.aggregator.grpc_server import start_server
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.grpc_transport import GrpcClientTransport
from gefl.edge_client.runtime import ClientOptions, ClientRuntime

import gefl.image_folder
from gefl.config import config_from_dict
from gefl.image_folder import write_split

from netutil import TOKEN, free_port, read_metrics, wait_for

SAMPLES = 60


def _serve(cfg: dict, state, port: int):
    coordinator = build_coordinator(config_from_dict(cfg), state, TOKEN)
    server, _, _ = start_server(coordinator, f"127.0.0.1:{port}")
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    return coordinator, server, driver


def test_a_client_takes_the_config_of_the_aggregator_it_registers_with_again(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    shards = tmp_path / "shards"
    write_split("fashion-mnist", 1, shards, samples_per_client=SAMPLES, seed=0)
    port = free_port()
    base = {"num_clients": 1, "tiers": ["cnn2"], "partition": {"samples_per_client": SAMPLES},
            "train": {"local_epochs": 1}, "network": {"heartbeat_interval": 0.5}}
    # First a FedAvg federation far longer than the test; then, on the same address, a GeFL-F one
    # whose generator round a client still holding the FedAvg config could not train.
    first = {**base, "name": "first", "algorithm": "fedavg", "rounds": 1000}
    second = {**base, "name": "second", "algorithm": "gefl-f", "rounds": 1,
              "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {"local_epochs": 1}}}
    opened = []
    real_open = gefl.image_folder._open_image

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    coordinator, server, driver = _serve(first, tmp_path / "first", port)
    runtime = ClientRuntime(GrpcClientTransport(f"127.0.0.1:{port}", TOKEN),
                            ClientOptions(shards / "client-000", tier="cnn2", name="board", threads=1, poll_s=1.0,
                                          give_up_s=120, state_dir=tmp_path / "device"))
    trained: list[int] = []
    with mock.patch.object(gefl.image_folder, "_open_image", counting_open):
        client = threading.Thread(target=lambda: trained.append(runtime.run()), daemon=True)
        client.start()
        try:
            wait_for(lambda: read_metrics(tmp_path / "first"), 120, "a round of the first federation")
        finally:
            coordinator.stopping.set()
            driver.join(30)
            server.stop(grace=None).wait()
        coordinator, server, driver = _serve(second, tmp_path / "second", port)
        try:
            client.join(180)
        finally:
            coordinator.stopping.set()
            driver.join(30)
            server.stop(grace=None).wait()
    assert not client.is_alive() and trained, "the client did not finish the second federation"
    assert coordinator.federation.finished
    phases = [(m["phase"], m["contributors"]) for m in read_metrics(tmp_path / "second")]
    assert ("generator", [0]) in phases, phases  # it trained the generator: it took the new config
    assert len(opened) == SAMPLES, f"{len(opened)} image reads for {SAMPLES} images"
    # 60 images at the default batch of 64: one step per epoch, which the board is told about
    assert any("1 step(s) per local epoch" in r.getMessage() for r in caplog.records), caplog.text
