"""The gRPC service against a real server on loopback: the contract, every refused upload, tokens,
TLS and mutual TLS, the health service. The aggregator runs in this process (a real grpc server on
a free port); clients talk to it through the real client transport."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from gefl.aggregator.grpc_server import TlsFiles, start_server
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.grpc_transport import GrpcClientTransport
from gefl.edge_client.transport import Unauthenticated, Unavailable
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gefl.config import config_from_dict
from gefl.protocol import TRAIN, Refused, RegisterRequest, UploadHeader
from gefl.protocol.wire import decode_arrays, encode_arrays, encode_state, sha256

from netutil import TOKEN, LogLines, make_certs, tampered, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"algorithm": "fedavg", "num_clients": 2, "tiers": ["cnn2"], "rounds": 2,
          "partition": {"samples_per_client": 100}, "network": {"min_clients": 1, "round_timeout": 120}}


class Aggregator:
    """A training aggregator on a free loopback port, its coordinator driving rounds on a thread."""

    def __init__(self, state_dir: Path, tls: TlsFiles | None = None, config: dict | None = None,
                 start: bool = True) -> None:
        self.log = LogLines()
        self.coordinator = build_coordinator(config_from_dict(config or CONFIG), state_dir, TOKEN)
        self.server, self.port, _ = start_server(self.coordinator, "127.0.0.1:0", tls)
        self.thread = threading.Thread(target=self.coordinator.run, daemon=True)
        if start:
            self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def state_bytes(self) -> bytes:
        return encode_state(self.coordinator.loop.logic.state.models["cnn2"])

    def stop(self) -> None:
        self.coordinator.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10)
        self.server.stop(grace=None).wait()
        self.log.close()


@pytest.fixture
def aggregator(tmp_path):
    agg = Aggregator(tmp_path / "state")
    yield agg
    agg.stop()


def _register(transport: GrpcClientTransport, name: str = "board-1") -> None:
    transport.register(RegisterRequest(name=name, tier="cnn2", num_samples=100, label_histogram=(10,) * 10))


def _header(task, payload: bytes, **changes) -> UploadHeader:
    fields = dict(round=task.round, phase=task.phase, name=task.upload_name, size=len(payload),
                  sha256=sha256(payload), num_samples=100, loss=0.5)
    fields.update(changes)
    return UploadHeader(**fields)


def test_committed_stubs_are_what_the_proto_generates(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    fresh = gen_protos.generate(tmp_path)
    assert [p.name for p in fresh] == ["gefl_v1_pb2.py", "gefl_v1_pb2.pyi", "gefl_v1_pb2_grpc.py"]
    for path in fresh:
        committed = ROOT / "protos" / path.name
        assert committed.read_text() == path.read_text(), (
            f"protos/{path.name} is stale: run `python scripts/gen_protos.py` and commit the result")


def test_health_service_reports_serving(aggregator):
    with grpc.insecure_channel(aggregator.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gefl.v1.Aggregator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_burst_of_health_watches_leaves_the_federation_served(tmp_path):
    """Health.Watch needs no token; 200 open watches must not crowd out a genuine client's calls."""
    from gefl.aggregator.grpc_server import MAX_HEALTH_WATCHES

    agg = Aggregator(tmp_path / "state", config={**CONFIG, "network": {"min_clients": 2}})
    channel = grpc.insecure_channel(agg.address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120) for _ in range(200)]
        outcomes = []
        for watch in watches:
            try:
                outcomes.append(next(watch).status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                outcomes.append(False)
        assert sum(outcomes) == MAX_HEALTH_WATCHES  # the rest refused at once, with a status that says why
        client = GrpcClientTransport(agg.address, TOKEN)
        _register(client)  # the federation's own calls still get through
        assert client.fetch_task(0.1).status == "wait"
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        agg.stop()


def test_a_server_at_its_call_limit_is_waited_for_not_taken_as_a_refusal(tmp_path):
    """grpc answers RESOURCE_EXHAUSTED when its concurrency limit is reached: a client must back off
    and retry (Unavailable), not give up as if the aggregator had refused it."""
    coordinator = build_coordinator(config_from_dict({**CONFIG, "network": {"min_clients": 2}}), tmp_path / "s", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0", max_workers=1)
    address = f"127.0.0.1:{port}"
    try:
        holder = GrpcClientTransport(address, TOKEN)
        _register(holder, "holder")
        outcomes: list[BaseException | None] = []

        def poll() -> None:  # no round opens (the quorum is two): each call waits out its half second
            try:
                holder.fetch_task(0.5)
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - the test sorts them below
                outcomes.append(exc)

        # More long polls than the server's limit (one worker + the health watches' share).
        threads = [threading.Thread(target=poll, daemon=True) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        busy = [o for o in outcomes if isinstance(o, Unavailable) and "Concurrent RPC limit" in str(o)]
        assert busy, outcomes  # the limit was met ...
        assert not [o for o in outcomes if isinstance(o, Refused)], outcomes  # ... and never taken as a verdict
    finally:
        coordinator.stopping.set()
        server.stop(grace=None).wait()


def test_every_bad_upload_is_refused_with_its_reason_and_leaves_the_global_model_alone(aggregator):
    client = GrpcClientTransport(aggregator.address, TOKEN)
    _register(client)
    task = client.fetch_task(wait_s=20)
    assert task.status == TRAIN and task.round == 1 and task.upload_name == "model"
    model = client.download(task.round, next(a for a in task.artifacts if a.name == "model"))
    before = aggregator.state_bytes()
    good = decode_arrays(model)

    def tensors(**changes: np.ndarray | None) -> bytes:
        return tampered(good, **changes)

    weight, key = "head__fc__weight", "head.fc.weight"
    nan = good[key].copy()
    nan[0, 0] = math.nan
    cases = [
        ("late round", lambda: (model, _header(task, model, round=task.round + 5)), "FAILED_PRECONDITION",
         "not open"),
        ("wrong phase", lambda: (model, _header(task, model, phase="head")), "INVALID_ARGUMENT", "phase"),
        ("wrong artifact", lambda: (model, _header(task, model, name="generator")), "INVALID_ARGUMENT", "artifact"),
        ("oversized", lambda: (model, _header(task, model, size=task.max_upload_bytes + 1)), "RESOURCE_EXHAUSTED",
         "exceeds the limit"),
        ("longer than announced", lambda: (model + b"x" * 10, _header(task, model)), "RESOURCE_EXHAUSTED",
         "goes past"),
        ("shorter than announced", lambda: (model[:-10], _header(task, model)), "DATA_LOSS", "announced"),
        ("checksum", lambda: (model, _header(task, model, sha256="0" * 64)), "DATA_LOSS", "sha256"),
        ("garbage", lambda: (b"\x00garbage" * 50, _header(task, b"\x00garbage" * 50)), "INVALID_ARGUMENT",
         "cannot decode"),
        ("wrong shape", lambda: (p := tensors(**{weight: np.zeros((3, 3), np.float32)}), _header(task, p)),
         "INVALID_ARGUMENT", "expected"),
        ("wrong dtype", lambda: (p := tensors(**{weight: good[key].astype(np.float64)}), _header(task, p)),
         "INVALID_ARGUMENT", "float64"),
        ("missing entry", lambda: (p := tensors(**{weight: None}), _header(task, p)), "INVALID_ARGUMENT", "differ"),
        ("NaN weights", lambda: (p := tensors(**{weight: nan}), _header(task, p)), "INVALID_ARGUMENT", "NaN"),
        ("NaN loss", lambda: (model, _header(task, model, loss=math.nan)), "INVALID_ARGUMENT", "loss"),
        ("inflated sample count", lambda: (model, _header(task, model, num_samples=10**6)), "INVALID_ARGUMENT",
         "num_samples"),
    ]
    for what, make, code, phrase in cases:
        payload, header = make()
        with pytest.raises(Refused) as refused:
            client.upload(header, payload)
        assert refused.value.code == code, (what, refused.value)
        assert phrase in str(refused.value), (what, refused.value)
        assert aggregator.state_bytes() == before, what
    assert len([line for line in aggregator.log if "refused" in line]) == len(cases)

    # A token that is not the client's is refused on every call.
    stranger = GrpcClientTransport(aggregator.address, TOKEN)
    stranger.token = "forged"
    with pytest.raises(Unauthenticated):
        stranger.fetch_task(wait_s=0)
    with pytest.raises(Unauthenticated):
        stranger.upload(_header(task, model), model)
    with pytest.raises(Unauthenticated):
        stranger.download(task.round, task.artifacts[0])

    # The round still counts exactly one result: the client's genuine one. Sending back the weights
    # unchanged means the aggregate must equal the model before the round, bit for bit.
    client.upload(_header(task, model), model)
    with pytest.raises(Refused) as again:
        client.upload(_header(task, model), model)
    assert again.value.code == "FAILED_PRECONDITION"
    nxt = client.fetch_task(wait_s=20)
    assert nxt.round == 2
    assert aggregator.state_bytes() == before
    client.close()


def test_registration_needs_the_enrolment_token_and_a_known_tier(aggregator):
    wrong = GrpcClientTransport(aggregator.address, "not-the-token")
    with pytest.raises(Unauthenticated, match="enrolment token"):
        _register(wrong)
    client = GrpcClientTransport(aggregator.address, TOKEN)
    with pytest.raises(Refused, match="not offered by this federation") as refused:
        client.register(RegisterRequest(name="b", tier="resnet18", num_samples=10))
    assert refused.value.code == "INVALID_ARGUMENT"
    with pytest.raises(Refused, match="needs the device's measured profile"):
        client.register(RegisterRequest(name="b", tier="auto", num_samples=10))
    with pytest.raises(Refused, match="add up"):
        client.register(RegisterRequest(name="b", tier="cnn2", num_samples=10, label_histogram=(3, 3)))
    for name in ("board\n", "board\nclient 0 registered: forged", "../b", ""):  # $ in a regex matches before \n
        with pytest.raises(Refused, match="is not valid") as bad_name:
            client.register(RegisterRequest(name=name, tier="cnn2", num_samples=10))
        assert bad_name.value.code == "INVALID_ARGUMENT"
    # Registering again under the same name, with the device's own credential, keeps the client id
    # and the token; a third name finds the federation full.
    _register(client, "a")
    first = client.token
    client.register(RegisterRequest(name="a", tier="cnn2", num_samples=100, credential=first))
    assert client.token == first and len(aggregator.coordinator.clients) == 1
    _register(client, "b")
    with pytest.raises(Refused, match="federation is full"):
        _register(client, "c")


def test_a_registered_name_goes_back_only_to_the_device_that_proves_it_owns_it(aggregator):
    """The enrolment token is the whole fleet's: with it alone, another device must not take a
    registered device's name, client id and token."""
    board = GrpcClientTransport(aggregator.address, TOKEN)
    _register(board, "board-1")
    own_id, own_token = aggregator.coordinator.clients[0].client_id, board.token
    intruder = GrpcClientTransport(aggregator.address, TOKEN)
    for credential in ("", "a-guessed-token", TOKEN):
        with pytest.raises(Unauthenticated, match="registered by another device"):
            intruder.register(RegisterRequest(name="board-1", tier="cnn2", num_samples=100, credential=credential))
    assert aggregator.coordinator.authenticate(own_token).client_id == own_id  # the device is undisturbed
    # The device itself, restarted (a new connection, its kept credential), gets its place back.
    again = GrpcClientTransport(aggregator.address, TOKEN)
    again.register(RegisterRequest(name="board-1", tier="cnn2", num_samples=100, credential=own_token))
    assert again.token == own_token and len(aggregator.coordinator.clients) == 1


def test_tls_and_mutual_tls(tmp_path):
    certs = make_certs(tmp_path / "certs")
    tls = Aggregator(tmp_path / "tls", TlsFiles(certs["server"], certs["server-key"]))
    try:
        _register(GrpcClientTransport(tls.address, TOKEN, ca=certs["ca"]), "tls-ok")
        with pytest.raises(Unavailable):  # plaintext against TLS: no connection at all
            _register(GrpcClientTransport(tls.address, TOKEN), "plain")
        with pytest.raises(Unavailable):  # a server certificate the client's CA did not sign
            _register(GrpcClientTransport(tls.address, TOKEN, ca=certs["other-ca"]), "wrong-ca")
    finally:
        tls.stop()
    mtls = Aggregator(tmp_path / "mtls", TlsFiles(certs["server"], certs["server-key"], certs["ca"]))
    try:
        board = GrpcClientTransport(mtls.address, TOKEN, ca=certs["ca"], cert=certs["client"], key=certs["client-key"])
        _register(board, "board-1")
        with pytest.raises(Unavailable):  # no client certificate: the handshake fails
            _register(GrpcClientTransport(mtls.address, TOKEN, ca=certs["ca"]), "no-cert")
        # The certificate names the device: another name is refused, and the name needs no other proof.
        with pytest.raises(Unauthenticated, match="not the name on this device's client certificate"):
            _register(board, "board-2")
        _register(board, "board-1")  # a restarted board that lost its credential file: the certificate suffices
        assert len(mtls.coordinator.clients) == 1
    finally:
        mtls.stop()


def _heartbeating(transport: GrpcClientTransport) -> threading.Event:
    """Keep a client alive (heartbeats on a thread) without it ever uploading: a slow device."""
    stop = threading.Event()

    def beat() -> None:
        with contextlib.suppress(Unavailable):  # the test's aggregator stopped first
            transport.heartbeats(0.2, stop)

    threading.Thread(target=beat, daemon=True).start()
    return stop


def test_a_slow_client_is_left_out_at_the_deadline_and_too_few_results_rerun_the_round(tmp_path):
    net = {"round_timeout": 1.5, "heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
    agg = Aggregator(tmp_path / "timeout", config={**CONFIG, "network": {**net, "min_clients": 1}}, start=False)
    try:
        fast, slow = GrpcClientTransport(agg.address, TOKEN), GrpcClientTransport(agg.address, TOKEN)
        _register(fast, "fast")
        _register(slow, "slow")
        stop = _heartbeating(slow)
        agg.thread.start()  # both are registered: round 1 takes both
        task = fast.fetch_task(wait_s=20)
        assert agg.coordinator.federation.current.participants == (0, 1)
        model = fast.download(task.round, task.artifacts[0])
        fast.upload(_header(task, model), model)
        wait_for(lambda: 1 in agg.coordinator.round_closed, 10, "round 1 to close at its deadline")
        took = agg.coordinator.round_closed[1] - agg.coordinator.round_started[1]
        assert 1.4 <= took < 3.0
        wait_for(lambda: any("1/2 results, 1 dropped" in line for line in agg.log), 10, "the round's line")
        stop.set()
    finally:
        agg.stop()

    agg = Aggregator(tmp_path / "quorum", config={**CONFIG, "network": {**net, "min_clients": 2}})
    try:
        a, b = GrpcClientTransport(agg.address, TOKEN), GrpcClientTransport(agg.address, TOKEN)
        _register(a, "a")
        _register(b, "b")
        stop = _heartbeating(b)
        task = a.fetch_task(wait_s=20)
        model = a.download(task.round, task.artifacts[0])
        a.upload(_header(task, model), model)
        wait_for(lambda: any("running the round again" in line for line in agg.log), 10, "the quorum to fail")
        assert agg.coordinator.federation.completed == 0
        # The same round, from the same global state, with both results this time.
        for client in (a, b):
            again = client.fetch_task(wait_s=20)
            assert again.round == 1
            weights = client.download(again.round, again.artifacts[0])
            assert weights == model
            client.upload(_header(again, weights), weights)
        wait_for(lambda: 1 in agg.coordinator.round_closed, 10, "round 1 to close with the quorum")
        stop.set()
    finally:
        agg.stop()


def test_auto_tier_is_chosen_by_the_device_policy_from_the_profile(tmp_path):
    config = {**CONFIG, "tiers": ["cnn2", "cnn5b", "resnet18"]}
    agg = Aggregator(tmp_path / "auto", config=config)
    try:
        client = GrpcClientTransport(agg.address, TOKEN)
        pi = {"arch": "aarch64", "cpu_count": 4, "memory_total_bytes": 4 << 30, "memory_available_bytes": 3 << 30,
              "board": "Raspberry Pi 4 Model B", "board_family": "raspberry-pi", "cuda": False,
              "train_samples_per_s": 400.0}
        small = client.register(RegisterRequest(name="pi", tier="auto", profile=pi, num_samples=600))
        big = client.register(RegisterRequest(name="desk", tier="auto", num_samples=600, profile={
            **pi, "memory_available_bytes": 20 << 30, "train_samples_per_s": 60_000.0}))
        assert small.tier in config["tiers"] and big.tier in config["tiers"]
        sizes = {t: i for i, t in enumerate(config["tiers"])}
        assert sizes[big.tier] > sizes[small.tier], (small, big)
        assert small.tier_reason and big.tier_reason
    finally:
        agg.stop()


def test_a_corrupt_checkpoint_or_another_config_in_the_state_dir_is_refused_by_name(tmp_path):
    from gefl.errors import GeflError

    state = tmp_path / "state"
    agg = Aggregator(state)
    client = GrpcClientTransport(agg.address, TOKEN)
    _register(client)
    wait_for(lambda: (state / "checkpoint.safetensors").exists(), 10, "the registry checkpoint")
    agg.stop()
    good = (state / "checkpoint.safetensors").read_bytes()
    (state / "checkpoint.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(GeflError, match="cannot read the checkpoint"):
        build_coordinator(config_from_dict(CONFIG), state, TOKEN)
    (state / "checkpoint.safetensors").write_bytes(good)
    with pytest.raises(GeflError, match=r"different config \(rounds differ\)"):
        build_coordinator(config_from_dict({**CONFIG, "rounds": 3}), state, TOKEN)
    resumed = build_coordinator(config_from_dict(CONFIG), state, TOKEN)
    assert [c.name for c in resumed.clients.values()] == ["board-1"]


def _checkpoint_after_a_registration(state: Path) -> bytes:
    agg = Aggregator(state)
    _register(GrpcClientTransport(agg.address, TOKEN))
    wait_for(lambda: (state / "checkpoint.safetensors").exists(), 60, "the registry checkpoint")
    agg.stop()
    return (state / "checkpoint.safetensors").read_bytes()


def test_a_damaged_or_non_finite_checkpoint_is_refused_not_resumed(tmp_path):
    """A bit flip or a run of 0xFF in the tensor data must not resume silently with other weights, and
    NaN weights (with a digest that matches them) must not resume at all."""
    import json as _json
    import struct

    from safetensors import safe_open

    from gefl.errors import GeflError
    from gefl.rounds.checkpoint import digest as _checkpoint_digest

    state = tmp_path / "state"
    good = _checkpoint_after_a_registration(state)
    data_start = 8 + struct.unpack("<Q", good[:8])[0]
    path = state / "checkpoint.safetensors"
    for damage in ("bit", "ff"):
        bad = bytearray(good)
        if damage == "bit":
            bad[data_start + 100] ^= 0x01
        else:
            bad[data_start + 64:data_start + 320] = b"\xff" * 256
        path.write_bytes(bytes(bad))
        with pytest.raises(GeflError, match="is damaged"):
            build_coordinator(config_from_dict(CONFIG), state, TOKEN)
    # NaN weights with a digest recomputed to match them: refused as non-finite.
    path.write_bytes(good)
    with safe_open(path, "np") as f:
        meta = _json.loads(f.metadata()["gefl"])
    arrays = decode_arrays(good)
    name = next(k for k, a in arrays.items() if a.dtype == np.float32)
    arrays[name] = np.full_like(arrays[name], np.nan)
    meta.pop("sha256")
    meta["sha256"] = _checkpoint_digest(arrays, meta)
    path.write_bytes(encode_arrays(arrays, {"gefl": _json.dumps(meta)}))
    with pytest.raises(GeflError, match="non-finite"):
        build_coordinator(config_from_dict(CONFIG), state, TOKEN)
    path.write_bytes(good)  # the undamaged file still resumes
    assert [c.name for c in build_coordinator(config_from_dict(CONFIG), state, TOKEN).clients.values()] == ["board-1"]


def test_an_unwritable_state_directory_or_checkpoint_stops_the_aggregator_in_one_paragraph(tmp_path):
    """At start (the state directory cannot be made) and mid-run (the checkpoint cannot be written):
    exit 2 with a message, never a traceback; mid-run the last good checkpoint is kept."""
    from netutil import Process, free_port

    (tmp_path / "a-file").write_text("in the way")
    start = Process(["aggregator", "serve", "--state-dir", str(tmp_path / "a-file" / "state"), "--listen",
                     f"127.0.0.1:{free_port()}"], env={"GEFL_TOKEN": TOKEN})
    assert start.wait(300) == 2, start.output
    assert "Traceback" not in start.output and "gefl: error: cannot" in start.output

    state = tmp_path / "state"
    good = _checkpoint_after_a_registration(state)
    (state / ".checkpoint.safetensors.tmp").mkdir()  # the next checkpoint write fails
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    serve = Process(["aggregator", "serve", "--config", str(config), "--state-dir", str(state), "--listen",
                     f"127.0.0.1:{port}"], env={"GEFL_TOKEN": TOKEN})
    try:
        serve.wait_line("serving gRPC", 300)
        board = GrpcClientTransport(f"127.0.0.1:{port}", TOKEN)  # a new registration: the registry must be saved
        _register(board, "board-2")
        assert serve.wait(300) == 2, serve.output
    finally:
        serve.kill()
    assert "Traceback" not in serve.output
    assert "cannot write the checkpoint" in serve.output and "last good checkpoint is kept" in serve.output
    assert (state / "checkpoint.safetensors").read_bytes() == good


def test_a_bug_in_the_aggregator_is_not_reported_to_the_device_as_its_fault(tmp_path):
    """A programming error behind a call is the aggregator's (gRPC UNKNOWN, which a client retries),
    not INVALID_ARGUMENT, which tells the device that its request was wrong."""
    agg = Aggregator(tmp_path / "state", start=False)

    def broken(request):
        raise ZeroDivisionError("a bug in the tier policy")

    agg.coordinator.loop.logic.choose_tier = broken
    try:
        with pytest.raises(Unavailable, match="UNKNOWN"):
            _register(GrpcClientTransport(agg.address, TOKEN))
    finally:
        agg.stop()
