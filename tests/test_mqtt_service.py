"""The MQTT transport against a real Mosquitto broker that each test starts on a free port: uploads
counted once, the retained generator for a late joiner, bad messages on every topic, TLS with
passwords and the ACL of configs/mosquitto/. The aggregator (coordinator + bridge) runs in this
process; clients talk to it through the real client transport and raw paho connections."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from gefl.aggregator.mosquitto import Mosquitto, free_port
from gefl.aggregator.mqtt_bridge import MqttBridge
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.mqtt_transport import MqttClientTransport

from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.protocol import TRAIN, RegisterRequest, UploadHeader
from gefl.protocol import mqtt as m
from gefl.protocol.wire import CHUNK_BYTES, decode_arrays, encode_arrays, encode_state, sha256

from netutil import TOKEN, LogLines, make_certs, wait_for

ROOT = Path(__file__).resolve().parent.parent
NETWORK = {"min_clients": 1, "round_timeout": 120, "heartbeat_timeout": 60}  # the tests send no heartbeats
FEDAVG = {"name": "mqtt-fedavg", "algorithm": "fedavg", "num_clients": 2, "tiers": ["cnn2"], "rounds": 2,
          "partition": {"samples_per_client": 100}, "network": NETWORK}
GEFL_F = {"name": "mqtt-geflf", "algorithm": "gefl-f", "num_clients": 2, "tiers": ["cnn2"], "rounds": 1,
          "partition": {"samples_per_client": 100}, "network": NETWORK,
          # float32 on the wire: the generator (1.5 MB) spans two chunks, which the dedup test needs
          "gefl": {"warmup_rounds": 1, "generator_rounds": 3, "generator": {"wire_dtype": "float32"}}}


class Aggregator:
    """Coordinator + MQTT bridge of a training federation, rounds driven on a thread."""

    def __init__(self, state_dir: Path, config: dict, url: str, auth: m.MqttAuth | None = None) -> None:
        self.log = LogLines()
        self.coordinator = build_coordinator(config_from_dict(config), state_dir, TOKEN)
        self.bridge = MqttBridge(self.coordinator, m.parse_broker_url(url), auth or m.MqttAuth())
        self.bridge.start()
        self.thread = threading.Thread(target=self.coordinator.run, daemon=True)
        self.thread.start()
        self.topics = self.bridge.topics

    def stop(self) -> None:
        self.coordinator.stopping.set()
        self.thread.join(10)
        self.bridge.stop()
        self.log.close()

    def metrics(self, round_number: int) -> dict | None:
        import json

        path = self.coordinator.loop.logic.run.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return next((r for r in map(json.loads, lines) if r["round"] == round_number), None)


class Raw:
    """A bare paho connection: the late joiner, the attacker, the ACL probe."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 ca: Path | None = None) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_message = lambda _c, _u, msg: self.messages.append((time.monotonic(), msg.topic, msg.payload))
        parsed = m.parse_broker_url(url)
        self.client.connect(parsed.host, parsed.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def on(self, topic: str) -> list[bytes]:
        return [payload for _, t, payload in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker():
    with Mosquitto() as b:
        yield b


def _transport(url: str, auth: m.MqttAuth | None = None) -> MqttClientTransport:
    return MqttClientTransport(m.parse_broker_url(url), TOKEN, auth or m.MqttAuth())


def _register(t: MqttClientTransport, name: str = "board-1"):
    return t.register(RegisterRequest(name=name, tier="cnn2", num_samples=100, label_histogram=(10,) * 10))


def _header(task, payload: bytes, **changes) -> UploadHeader:
    fields = dict(round=task.round, phase=task.phase, name=task.upload_name, size=len(payload),
                  sha256=sha256(payload), num_samples=100, loss=0.5)
    fields.update(changes)
    return UploadHeader(**fields)


def _frame(t: MqttClientTransport, header: UploadHeader, payload: bytes, index: int, token: str | None = None,
           count: int | None = None) -> bytes:
    meta = {"token": t.token if token is None else token, "round": header.round, "phase": header.phase,
            "name": header.name, "size": header.size, "sha256": header.sha256, "num_samples": header.num_samples,
            "loss": header.loss, "index": index, "count": count or max(1, math.ceil(header.size / CHUNK_BYTES))}
    return m.encode_frame(meta, payload[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES])


def _task(t: MqttClientTransport, phase: str):
    task = t.fetch_task(30)
    assert task.status == TRAIN and task.phase == phase, task
    return task


def test_upload_counted_once_despite_redelivered_chunks_and_a_resend_and_late_joiner_gets_generator(tmp_path, broker):
    agg = Aggregator(tmp_path / "state", GEFL_F, broker.url)  # the client finds the federation by itself
    t = _transport(broker.url)
    try:
        reg = _register(t)
        assert t.address.endswith("/mqtt-geflf")
        task = _task(t, "warmup")
        model = t.download(task.round, task.artifacts[0])
        assert t.upload(_header(task, bytes(model)), bytes(model)).endswith("accepted")
        wait_for(lambda: agg.metrics(1) is not None, 30, "round 1 to close")

        task = _task(t, "generator")
        ref = next(a for a in task.artifacts if a.name == "generator")
        generator = bytes(t.download(task.round, ref))
        assert len(generator) > CHUNK_BYTES  # two chunks at least: the dedup is per chunk index
        header = _header(task, generator)
        topic = agg.topics.client("board-1", "result")
        t.connection.publish(topic, _frame(t, header, generator, 0))  # chunk 0 early: it will arrive twice
        time.sleep(0.2)
        assert t.upload(header, generator).endswith("accepted")
        assert t.upload(header, generator).endswith("already counted")  # a resend after a lost verdict
        wait_for(lambda: agg.metrics(2) is not None, 30, "round 2 to close")
        assert agg.metrics(2)["contributors"] == [reg.client_id]
        assert agg.metrics(2)["bytes"]["up"]["generator"] == len(generator)

        # Round 3 (generator phase) is open: a device that joins now has the generator at once.
        _task(t, "generator")
        joiner = Raw(broker.url)
        started = time.monotonic()
        joiner.subscribe(agg.topics.current)
        wait_for(lambda: joiner.on(agg.topics.current), 5, "the retained current-artifacts message")
        current = m.decode_json(joiner.on(agg.topics.current)[-1], "current")
        entry = next(a for a in current["tiers"]["cnn2"] if a["name"] == "generator")
        joiner.subscribe(agg.topics.chunks(entry["sha256"]))
        count = math.ceil(entry["size"] / CHUNK_BYTES)
        wait_for(lambda: len({tp for _, tp, _ in joiner.messages if entry["sha256"] in tp}) == count, 5,
                 "the retained generator chunks")
        elapsed = time.monotonic() - started
        parts = sorted((m.decode_frame(p, "chunk") for _, tp, p in joiner.messages if entry["sha256"] in tp),
                       key=lambda hd: hd[0]["index"])
        received = b"".join(data for _, data in parts)
        assert sha256(received) == entry["sha256"]
        assert received == encode_state(agg.coordinator.loop.logic.state.generator)  # the global generator itself
        assert elapsed < 2.0
        joiner.close()
    finally:
        t.close()
        agg.stop()


def _global(agg: Aggregator) -> bytes:
    return encode_state(agg.coordinator.loop.logic.state.models["cnn2"])


def test_bad_messages_on_every_topic_are_dropped_and_leave_the_global_state_untouched(tmp_path, broker):
    agg = Aggregator(tmp_path / "state", FEDAVG, broker.url + "/mqtt-fedavg")
    t = _transport(broker.url + "/mqtt-fedavg")
    attacker = Raw(broker.url)
    try:
        reg = _register(t)
        task = _task(t, "train")
        model = bytes(t.download(task.round, task.artifacts[0]))
        before = _global(agg)
        f = agg.topics
        good = _header(task, model)
        arrays = decode_arrays(model)
        largest = max(arrays, key=lambda k: arrays[k].size)
        wrong_shape = encode_arrays({**arrays, largest: np.zeros(3, np.float32)})
        nan = encode_arrays({k: np.full_like(v, np.nan) if v.dtype == np.float32 else v for k, v in arrays.items()})
        result, status = f.client("board-1", "result"), f.client("board-1", "status")
        bad = {
            f.client("board-9", "register"): [
                b"\x00\xffgarbage", b'{"name": "board-9", "tier"', b"{" + b" " * 100_000 + b"}",
                b"[" * 60_000,
                m.encode_json({"request_id": "x", "name": "board-1", "tier": "cnn2", "num_samples": 1}),
                m.encode_json({"request_id": "x", "name": "board-9", "tier": "cnn2", "num_samples": 100,
                               "enrolment_token": "wrong"})],
            f.client("a b", "register"): [m.encode_json({"request_id": "x", "name": "a b"})],
            result: [b"garbage", b"\x00\x00\x00", b"\x00" * (2 * CHUNK_BYTES),
                     _frame(t, good, model, 0, token="forged"),
                     _frame(t, good, model, 0)[:-100],  # truncated chunk
                     _frame(t, _header(task, wrong_shape), wrong_shape, 0),
                     _frame(t, _header(task, nan), nan, 0),
                     _frame(t, _header(task, model, round=task.round + 5), model, 0),
                     _frame(t, _header(task, model, size=10**9), model, 0)],
            f.client("board-2", "result"): [_frame(t, good, model, 0)],  # board-1's token on board-2's topic
            status: [b"garbage", m.encode_json({"status": "alive", "token": "forged"})],
        }
        expected = 0
        for topic, payloads in bad.items():
            attacker.subscribe(topic)  # harmless: the attacker also reads what it can
            for payload in payloads:
                attacker.publish(topic, payload)
                expected += 1
        # Topics only the aggregator writes to: the client drops garbage there.
        for topic in (f.client("board-1", "task"), f.current, f.chunk("0" * 64, 0), f.aggregator_status):
            attacker.publish(topic, b"\x00garbage")
        wait_for(lambda: agg.bridge.dropped >= expected, 30, f"{expected} drops")
        assert agg.bridge.dropped == expected
        assert _global(agg) == before
        assert not agg.coordinator.federation.received
        for phrase in ("not JSON", "more than", "too short", "nested more than", "registers on its own topic",
                       "not a client topic", "enrolment token", "unknown client token", "truncated", "mis-addressed",
                       "is not open", "exceeds the limit", "NaN or infinite", "expected torch.float32"):
            assert any(phrase in line for line in agg.log), phrase
        assert t.upload(good, model).endswith("accepted")  # the genuine upload still counts
        wait_for(lambda: agg.metrics(1) is not None, 30, "round 1 to close")
        assert agg.metrics(1)["contributors"] == [reg.client_id]
        assert _task(t, "train").round == 2  # the client survived garbage on its own task topic
    finally:
        attacker.close()
        t.close()
        agg.stop()


USERS = (("aggregator", "agg-pw"), ("board-1", "b1-pw"), ("board-2", "b2-pw"))


def start_secure_broker(tmp_path: Path) -> tuple[Mosquitto, str, dict[str, Path]]:
    """Mosquitto configured from configs/mosquitto/ (TLS, passwords for USERS, the ACL), on a free port:
    (broker, URL, the PKI's files). tests/test_mqtt_attacks.py uses it too."""
    work = tmp_path / "mosquitto"
    (work / "certs").mkdir(parents=True)
    certs = make_certs(tmp_path / "pki")
    for name, target in (("ca", "ca.crt"), ("server", "server.crt"), ("server-key", "server.key")):
        shutil.copy(certs[name], work / "certs" / target)
    shutil.copy(ROOT / "configs" / "mosquitto" / "acl", work / "acl")
    port = free_port()
    conf = (ROOT / "configs" / "mosquitto" / "mosquitto.conf").read_text()
    assert "\nlistener 8883\n" in conf
    conf = conf.replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
    if os.geteuid() == 0:  # as root, mosquitto becomes user `mosquitto`, who cannot read pytest's private tmp dir
        conf += "\nuser root\n"
    (work / "mosquitto.conf").write_text(conf)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for i, (user, password) in enumerate(USERS):
        subprocess.run([passwd, *(["-c"] if i == 0 else []), "-b", str(work / "passwd"), user, password], check=True)
    (work / "passwd").chmod(0o600)
    broker = Mosquitto(port, (work / "mosquitto.conf").read_text(), workdir=work)
    broker.start()
    return broker, f"mqtts://127.0.0.1:{port}", certs


@pytest.fixture
def secure_broker(tmp_path):
    """(URL, PKI files) of a broker built from configs/mosquitto/."""
    broker, url, certs = start_secure_broker(tmp_path)
    yield url, certs
    broker.close()


def test_tls_with_passwords_and_acl_from_the_example_config(tmp_path, secure_broker):
    url, certs = secure_broker
    auth = m.MqttAuth("aggregator", "agg-pw", certs["ca"])
    agg = Aggregator(tmp_path / "state", FEDAVG, url, auth)
    t = _transport(url, m.MqttAuth("board-1", "b1-pw", certs["ca"]))
    other = Raw(url, "board-2", "b2-pw", certs["ca"])
    try:
        _register(t)
        task = _task(t, "train")
        model = bytes(t.download(task.round, task.artifacts[0]))
        assert t.upload(_header(task, model), model).endswith("accepted")
        # board-2 may read its own task topic but not board-1's (the retained task is there).
        other.subscribe(agg.topics.client("board-1", "task"))
        other.subscribe(agg.topics.aggregator_status)
        wait_for(lambda: other.on(agg.topics.aggregator_status), 10, "board-2 to read the aggregator status")
        time.sleep(0.5)
        assert other.on(agg.topics.client("board-1", "task")) == []
        # A wrong password is refused by name, at once; a client without the CA cannot connect.
        with pytest.raises(GeflError, match="refused the connection"):
            _register(_transport(url, m.MqttAuth("board-2", "wrong", certs["ca"])), "board-2")
        with pytest.raises(GeflError, match="CA certificate"):
            _transport(url, m.MqttAuth("board-2", "b2-pw"))._connect("board-2")
    finally:
        other.close()
        t.close()
        agg.stop()


def test_broker_urls_are_checked():
    assert m.parse_broker_url("mqtts://broker.local/fmnist") == m.BrokerUrl("broker.local", 8883, True, "fmnist")
    assert m.parse_broker_url("mqtt://10.0.0.2:1884").port == 1884
    for bad, phrase in (("http://x", "not valid"), ("mqtt://u:p@x", "not in the URL"), ("mqtt://x/a/b", "topic level")):
        with pytest.raises(GeflError, match=phrase):
            m.parse_broker_url(bad)
