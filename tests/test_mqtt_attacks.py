"""What another user of the broker can do to an MQTT federation, each against a real Mosquitto: have
uploads refused (and the client told), forge or replay a client's offline message, feed a client's
task topic garbage, forged tasks and forged artifact chunks, register under another device's name,
and keep the aggregator from subscribing. Then all of it at once, throughout a run of real `gefl
client run` processes, which must compute exactly the weights of an undisturbed run.

The broker is anonymous and has no ACL unless a test says otherwise: a deployment can be like
that, and then only the aggregator's and the client's own checks stand between an attacker and
the federation."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gefl.aggregator.mosquitto import Mosquitto, free_port
from gefl.aggregator.mqtt_bridge import MqttBridge
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.mqtt_transport import MqttClientTransport
from gefl.edge_client.transport import Unauthenticated
from test_mqtt_service import (
    FEDAVG,
    USERS,
    Aggregator,
    Raw,
    _global,
    _header,
    _register,
    _task,
    _transport,
    start_secure_broker,
)

from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.protocol import PROTOCOL_VERSION, TRAIN, Refused, RegisterRequest
from gefl.protocol import mqtt as m
from gefl.protocol.wire import CHUNK_BYTES, decode_arrays

from netutil import TOKEN, LogLines, Process, tampered, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker():
    with Mosquitto() as b:
        yield b


def _request() -> RegisterRequest:
    return RegisterRequest(name="board-1", tier="cnn2", num_samples=100, label_histogram=(10,) * 10)


def _offline_lines(agg: Aggregator) -> list[str]:
    return [line for line in agg.log if " is offline" in line]


# ------------------------------------------------------------------------------ 1. refusals reach the client
def test_every_bad_upload_is_refused_to_the_client_with_its_reason_and_leaves_the_global_model_alone(
        tmp_path, broker):
    """As tests/test_grpc_service.py's test for gRPC: each kind of bad upload, sent by the real client
    transport, comes back to it as a Refused with the code and reason, at once (not after the 30 s
    a lost verdict costs), and the global model does not move."""
    agg = Aggregator(tmp_path / "state", FEDAVG, broker.url + "/mqtt-fedavg")
    client = _transport(broker.url + "/mqtt-fedavg")
    try:
        _register(client)
        task = _task(client, "train")
        model = bytes(client.download(task.round, task.artifacts[0]))
        assert len(model) < CHUNK_BYTES  # one chunk: "truncated" and "longer" are about that chunk
        before = _global(agg)
        good = decode_arrays(model)
        key = "head.fc.weight"

        def tensors(**changes: np.ndarray | None) -> bytes:
            return tampered(good, **changes)

        weight = "head__fc__weight"
        nan = good[key].copy()
        nan[0, 0] = math.nan
        cases = [
            ("late round", lambda: (model, _header(task, model, round=task.round + 5)), "FAILED_PRECONDITION",
             "not open"),
            ("wrong phase", lambda: (model, _header(task, model, phase="head")), "INVALID_ARGUMENT", "phase"),
            ("wrong artifact", lambda: (model, _header(task, model, name="generator")), "INVALID_ARGUMENT",
             "artifact"),
            ("oversized", lambda: (model, _header(task, model, size=task.max_upload_bytes + 1)),
             "RESOURCE_EXHAUSTED", "exceeds the limit"),
            ("longer than announced", lambda: (model + b"x" * 10, _header(task, model)), "RESOURCE_EXHAUSTED",
             "goes past"),
            ("truncated", lambda: (model[:-10], _header(task, model)), "DATA_LOSS", "truncated"),
            ("checksum", lambda: (model, _header(task, model, sha256="0" * 64)), "DATA_LOSS", "sha256"),
            ("bad checksum format", lambda: (model, _header(task, model, sha256="X" * 64)), "INVALID_ARGUMENT",
             "hex digits"),
            ("garbage", lambda: (b"\x00garbage" * 50, _header(task, b"\x00garbage" * 50)), "INVALID_ARGUMENT",
             "cannot decode"),
            ("wrong shape", lambda: (p := tensors(**{weight: np.zeros((3, 3), np.float32)}), _header(task, p)),
             "INVALID_ARGUMENT", "expected"),
            ("wrong dtype", lambda: (p := tensors(**{weight: good[key].astype(np.float64)}), _header(task, p)),
             "INVALID_ARGUMENT", "float64"),
            ("missing entry", lambda: (p := tensors(**{weight: None}), _header(task, p)), "INVALID_ARGUMENT",
             "differ"),
            ("extra entry", lambda: (p := tensors(extra=np.zeros(3, np.float32)), _header(task, p)),
             "INVALID_ARGUMENT", "differ"),
            ("NaN weights", lambda: (p := tensors(**{weight: nan}), _header(task, p)), "INVALID_ARGUMENT", "NaN"),
            ("NaN loss", lambda: (model, _header(task, model, loss=math.nan)), "INVALID_ARGUMENT", "loss"),
            ("inflated sample count", lambda: (model, _header(task, model, num_samples=10**6)), "INVALID_ARGUMENT",
             "num_samples"),
            ("no samples", lambda: (model, _header(task, model, num_samples=0)), "INVALID_ARGUMENT", "num_samples"),
        ]
        for what, make, code, phrase in cases:
            payload, header = make()
            with pytest.raises(Refused) as refused:  # a timed-out request would raise Unavailable instead
                client.upload(header, payload)
            assert refused.value.code == code, (what, refused.value)
            assert phrase in str(refused.value), (what, refused.value)
            assert _global(agg) == before, what
            assert not agg.coordinator.federation.received, what
        # One refusal per case: the first attempt got its verdict, none was sent again after a timeout.
        assert len([line for line in agg.log if "refused [" in line and "upload from" in line]) == len(cases)
        assert not [line for line in agg.log if "unexpected" in line], agg.log

        # A token that is not the client's: refused as unauthenticated, and told so.
        stranger = _transport(broker.url + "/mqtt-fedavg")
        stranger._connect("board-2")
        stranger.token = "forged"
        with pytest.raises(Unauthenticated):
            stranger.upload(_header(task, model), model)
        stranger.close()

        # The genuine upload still counts, once; sending it again is answered, not timed out.
        assert client.upload(_header(task, model), model).endswith("accepted")
        assert client.upload(_header(task, model), model).endswith("already counted")
        wait_for(lambda: agg.metrics(1) is not None, 30, "round 1 to close")
        assert _task(client, "train").round == 2  # the client moved on
        assert _global(agg) == before  # the weights came back unchanged: FedAvg of one equals them
    finally:
        client.close()
        agg.stop()


# ------------------------------------------------------------------------------ 2. the offline message
def test_forged_and_replayed_offline_messages_change_nothing_and_a_genuine_one_counts(tmp_path, broker):
    config = {**FEDAVG, "network": {**FEDAVG["network"], "heartbeat_interval": 0.5}}
    agg = Aggregator(tmp_path / "state", config, broker.url + "/mqtt-fedavg")
    client = _transport(broker.url + "/mqtt-fedavg")
    attacker = Raw(broker.url)
    stop = threading.Event()
    try:
        reg = _register(client)
        status = agg.topics.client("board-1", "status")
        attacker.subscribe(status)  # an open broker: anyone reads everything, wills included
        beats = threading.Thread(target=client.heartbeats, args=(0.5, stop), daemon=True)
        beats.start()

        def online() -> bool:  # a registration replaces the coordinator's record
            return agg.coordinator.clients[reg.client_id].online

        time.sleep(1.5)  # a few heartbeats
        for _ in range(3):  # the forgery anyone could publish: no token, no MAC
            attacker.publish(status, b'{"status": "offline"}')
        time.sleep(1.0)
        assert online() and not _offline_lines(agg), _offline_lines(agg)

        wait_for(lambda: agg.bridge._sessions.get(reg.client_id) == client.session, 10, "the first heartbeat")
        forgeries = [m.encode_json({"status": "offline", "session": client.session}),
                     m.encode_json({"status": "offline", "session": client.session, "mac": "0" * 64}),
                     m.offline_message(m.key_of("not-the-token"), client.session, "board-1"),
                     m.offline_message(m.key_of(client.token), client.session, "board-2"),  # another's MAC
                     m.offline_message(m.key_of(client.token), m.new_session(), "board-1")]  # another session
        dropped = agg.bridge.dropped
        for payload in forgeries:
            attacker.publish(status, payload)
        wait_for(lambda: agg.bridge.dropped >= dropped + len(forgeries), 10, "the forgeries to be dropped")
        assert online() and not _offline_lines(agg)
        assert any("forged or replayed" in line for line in agg.log)

        # The connection drops for real: the broker publishes the genuine will, which counts...
        first_session = client.session
        client.connection.client.socket().close()
        wait_for(lambda: _offline_lines(agg), 20, "the genuine last will to take the client offline")
        will = next(p for p in attacker.on(status) if b'"offline"' in p and first_session.encode() in p)
        # ... the client reconnects with a new session and its heartbeats bring it back ...
        wait_for(lambda: client.session != first_session and online(), 30, "the client to come back")
        wait_for(lambda: agg.bridge._sessions.get(reg.client_id) == client.session, 10, "the new session")
        # ... and the old will, replayed, is a session that is over: nothing happens.
        for _ in range(5):
            attacker.publish(status, will)
        time.sleep(1.0)
        assert online() and len(_offline_lines(agg)) == 1, _offline_lines(agg)

        # Closing cleanly says "offline" for the current session: that counts too.
        stop.set()
        beats.join(5)
        client.close()
        wait_for(lambda: len(_offline_lines(agg)) == 2, 10, "the last words to take the client offline")

        # A restarted device that kept its credential connects with a will MAC'd with it at once:
        # the registration confirms that token, so no reconnection is needed, and the will counts.
        again = _transport(broker.url + "/mqtt-fedavg")
        assert again.register(dataclasses.replace(_request(), credential=reg.token)).token == reg.token
        assert again.connection.generation == 1  # the first connection: never restarted
        stop.clear()
        beats = threading.Thread(target=again.heartbeats, args=(0.5, stop), daemon=True)
        beats.start()
        wait_for(lambda: agg.bridge._sessions.get(reg.client_id) == again.session and online(), 10,
                 "the restarted device's session")
        again.connection.client.socket().close()
        wait_for(lambda: len(_offline_lines(agg)) == 3, 20, "the restarted device's will to count")
        stop.set()
        again.close()
    finally:
        stop.set()
        attacker.close()
        client.close()
        agg.stop()


# ------------------------------------------------------------------------------ 3. the client's task topic
def test_the_client_survives_deep_json_and_ignores_forged_tasks_replies_and_chunks(tmp_path, broker):
    agg = Aggregator(tmp_path / "state", FEDAVG, broker.url + "/mqtt-fedavg")
    said = LogLines()  # the client's transport logs what it drops
    client = MqttClientTransport(m.parse_broker_url(broker.url + "/mqtt-fedavg"), TOKEN, m.MqttAuth())
    attacker = Raw(broker.url)
    stop = threading.Event()
    try:
        _register(client)
        threading.Thread(target=client.heartbeats, args=(0.5, stop), daemon=True).start()
        f = agg.topics
        task_topic, reply_topic = f.client("board-1", "task"), f.client("board-1", "reply")
        attacker.subscribe(task_topic)
        wait_for(lambda: attacker.on(task_topic), 10, "the sealed task")
        genuine = attacker.on(task_topic)[-1]
        unsealed_finished = json.dumps({"id": "x:999", "status": "finished", "round": 0, "phase": "",
                                        "tier": "", "seed": 0, "upload_name": "", "max_upload_bytes": 0,
                                        "deadline_s": 0, "artifacts": []}).encode()
        # What anyone on an open broker can publish: 60 000 brackets, and "the run is finished".
        for payload in (b"[" * 60_000, unsealed_finished):
            attacker.client.publish(task_topic, payload, qos=1).wait_for_publish(5)
        time.sleep(1.0)
        network = client.connection.client._thread
        assert network is not None and network.is_alive(), "paho's network thread died"
        task = client.fetch_task(10)
        assert task.status == TRAIN and task.round == 1, task  # and the client did not stop

        attacks = [
            (task_topic, b"[" * 60_000, False),
            (task_topic, b"{\"a\":" * 20_000, False),
            (task_topic, unsealed_finished, False),
            (task_topic, b"0" * 64 + b"\n" + unsealed_finished, False),  # a MAC that does not verify
            (task_topic, m.seal(m.key_of(TOKEN), task_topic, m.decode_json(unsealed_finished, "t")), False),
            (task_topic, m.seal(m.key_of(client.token), f.client("board-2", "task"),
                                m.decode_json(unsealed_finished, "t")), False),  # sealed for another topic
            (reply_topic, b"[" * 60_000, False),
            (reply_topic, m.encode_json({"op": "upload", "ok": False, "code": "UNAUTHENTICATED"}), False),
            (reply_topic, m.seal(m.key_of(TOKEN), reply_topic,  # the enrolment key seals registrations only
                                 {"op": "upload", "ok": False, "code": "UNAUTHENTICATED", "message": "x"}), False),
            (task_topic, unsealed_finished, True),  # retained: replaces the genuine retained task
        ]
        for topic, payload, retain in attacks:
            attacker.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        for phrase in ("not sealed by the aggregator", "does not verify",
                       "only a registration reply may be sealed with the enrolment token"):
            wait_for(lambda p=phrase: any(p in s for s in said), 10, f"the client to drop a message: {phrase}")
        time.sleep(0.5)  # the last ones too
        assert client.connection.client._thread.is_alive()
        assert not client._finished and not client._unauthenticated
        assert client._task is not None and client._task[1] == task

        # A forged chunk on the model's artifact topic, retained, so that it replaces the genuine one:
        # the client drops it and keeps waiting; its heartbeats name the missing chunk, and the
        # aggregator publishes it again.
        ref = task.artifacts[0]
        data = agg.coordinator.open_artifacts()[1]["cnn2"][ref.name]
        header = {"sha256": ref.sha256, "name": ref.name, "size": ref.size, "index": 0, "count": 1}
        attacker.client.publish(f.chunk(ref.sha256, 0), m.encode_frame(header, b"\x00" * len(data)), qos=1,
                                retain=True).wait_for_publish(5)
        time.sleep(0.3)
        got: list = []
        downloading = threading.Thread(target=lambda: got.append(client.download(task.round, ref)), daemon=True)
        downloading.start()
        wait_for(lambda: any("sha256 is not the one the task lists" in s for s in said), 10, "the forged chunk")
        assert not got
        downloading.join(30)
        assert got and bytes(got[0]) == data

        # The aggregator resends the task the retained forgery replaced to a client whose heartbeat
        # says it lacks it: a client that reconnects now gets the genuine task again.
        assert m.decode_json(genuine.partition(b"\n")[2], "t")["status"] == TRAIN
        later = Raw(broker.url)
        later.subscribe(task_topic)
        wait_for(lambda: later.on(task_topic), 10, "the retained task")
        assert later.on(task_topic)[-1] == unsealed_finished  # the forgery is what the broker holds now

        def lacking() -> bool:  # what a client says whose task was lost: it holds none
            client.connection.publish(f.client("board-1", "status"), m.encode_json(
                {"status": "alive", "token": client.token, "session": client.session, "task": ""}), qos=0)
            return later.on(task_topic)[-1] == genuine

        wait_for(lacking, 15, "the task to be sent again", interval=1.0)
        later.close()
        assert not [s for s in said if "unexpected" in s], said
    finally:
        stop.set()
        attacker.close()
        client.close()
        agg.stop()
        said.close()


def test_json_nesting_is_bounded_before_parsing():
    for payload in (b"[" * 60_000, b'{"a":' * 33 + b"[]" + b"}" * 33, b'{"a":[' + b"[" * 40 + b"]" * 40 + b"]}"):
        with pytest.raises(m.Malformed, match="nested more than"):
            m.decode_json(payload, "message")
    deep = m.MAX_JSON_DEPTH
    assert m.decode_json(b'{"a":' * (deep - 1) + b"[]" + b"}" * (deep - 1), "ok")  # exactly the bound
    # Brackets inside strings (escaped quotes too) are text, not nesting.
    assert m.decode_json(b'{"a": "' + b"[" * 1000 + b'\\"' + b"{" * 1000 + b'"}', "ok")["a"].startswith("[[")


# ------------------------------------------------------------------------------ 4. a device's identity
def test_a_device_registers_only_under_its_own_name(tmp_path):
    """On an open broker the topic names the device, and a body naming another is refused; under the
    example ACL a device cannot even write another's register topic, nor any topic of another device
    or of the aggregator, nor read what is another's."""
    broker, url, certs = start_secure_broker(tmp_path)
    auth = m.MqttAuth("aggregator", "agg-pw", certs["ca"])
    agg = Aggregator(tmp_path / "state", FEDAVG, url, auth)
    passwords = dict(USERS)
    board2 = Raw(url, "board-2", passwords["board-2"], certs["ca"])
    # What gets through is seen by those who may read it: the aggregator's user reads every device's
    # register, result and status topics; board-1's user its task and reply, the artifacts and the
    # aggregator's status.
    as_aggregator = Raw(url, "aggregator", passwords["aggregator"], certs["ca"])
    as_board1 = Raw(url, "board-1", passwords["board-1"], certs["ca"])
    try:
        f = agg.topics
        as_aggregator.subscribe(f"{f.root}/#")
        for topic in (f.client("board-1", "task"), f.client("board-1", "reply"), f"{f.root}/artifacts/#",
                      f.aggregator_status):
            as_board1.subscribe(topic)
        for topic in (f.client("board-2", "reply"), f.client("board-1", "reply"), f.client("board-1", "task"),
                      f.client("board-1", "status"), f.every_client("status"), f.every_client("result"),
                      f.every_client("register")):
            board2.subscribe(topic)
        time.sleep(0.3)

        def registration(name: str, request_id: str) -> bytes:
            return m.encode_json({"request_id": request_id, "enrolment_token": TOKEN,
                                  "protocol_version": PROTOCOL_VERSION,
                                  "name": name, "tier": "cnn2", "num_samples": 100})

        board2.publish(f"{f.root}/register", registration("board-1", "old-topic"))  # the old shared topic
        board2.publish(f.client("board-1", "register"), registration("board-1", "others-topic"))
        board2.publish(f.client("board-2", "register"), registration("board-1", "own-topic-other-name"))
        forged = m.encode_json({"status": "offline"})
        for topic in (f.client("board-1", "status"), f.client("board-1", "result"), f.client("board-1", "task"),
                      f.client("board-1", "reply"), f.aggregator_status, f.current, f.chunk("0" * 64, 0)):
            board2.publish(topic, forged)
        time.sleep(1.0)
        assert not agg.coordinator.clients  # nobody was registered by any of it
        wait_for(lambda: board2.on(f.client("board-2", "reply")), 10, "board-2's refusal")
        reply, _ = m.unseal(board2.on(f.client("board-2", "reply"))[-1], f.client("board-2", "reply"),
                            [m.key_of(TOKEN)], "reply")
        assert reply["ok"] is False and reply["request_id"] == "own-topic-other-name"
        assert "registers on its own topic" in reply["message"]
        through = [t for _, t, _ in as_aggregator.messages if "/client/board-1/" in t or t == f"{f.root}/register"]
        assert through == [], through  # the broker let none of board-2's writes on board-1's topics through
        assert [t for _, t, p in as_board1.messages if p == forged] == []

        # board-1 itself registers under its name; board-2 reads none of its messages (tokens!).
        client = _transport(url, m.MqttAuth("board-1", passwords["board-1"], certs["ca"]))
        reg = _register(client)
        assert agg.coordinator.clients[reg.client_id].name == "board-1"
        assert _task(client, "train").round == 1
        client.close()
        time.sleep(0.5)
        assert [t for _, t, _ in board2.messages if "board-1" in t] == []
        assert [t for _, t, _ in as_board1.messages if t == f.client("board-1", "task")]  # board-1 reads its own
    finally:
        board2.close()
        as_aggregator.close()
        as_board1.close()
        agg.stop()
        broker.close()


# ------------------------------------------------------------------------------ 5. publishes and subscriptions
def _dynsec_broker(tmp_path: Path, denied: str) -> Mosquitto:
    """An anonymous Mosquitto whose dynamic-security ACL refuses subscriptions to `denied` (the plain
    acl_file never refuses a subscription: it filters deliveries)."""
    plugin = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    if not plugin.exists():
        pytest.skip("mosquitto's dynamic security plugin is not installed")
    work = tmp_path / "dynsec"
    work.mkdir()
    (work / "dynsec.json").write_text(json.dumps({
        "clients": [], "groups": [{"groupname": "anonymous", "roles": [{"rolename": "no-status"}]}],
        "anonymousGroup": "anonymous",
        "roles": [{"rolename": "no-status", "acls": [{"acltype": "subscribePattern", "topic": denied,
                                                      "allow": False}]}],
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                             "unsubscribe": True}}))
    port = free_port()
    conf = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"plugin {plugin}\nplugin_opt_config_file {work / 'dynsec.json'}\n")
    if __import__("os").geteuid() == 0:
        conf += "user root\n"
    return Mosquitto(port, conf, workdir=work).start()


def test_a_refused_subscription_is_an_error_naming_the_topic_and_failed_publishes_are_counted(tmp_path):
    broker = _dynsec_broker(tmp_path, "gefl/+/client/+/status")
    log = LogLines()
    coordinator = build_coordinator(config_from_dict(FEDAVG), tmp_path / "state", TOKEN)
    try:
        bridge = MqttBridge(coordinator, m.parse_broker_url(broker.url), m.MqttAuth())
        with pytest.raises(GeflError, match=r"refused the aggregator's subscription to gefl/mqtt-fedavg/client/\+/"
                                            r"status") as refused:
            bridge.start(timeout=10)
        assert "ACL" in str(refused.value)
        assert any("refused the subscription" in line and "gefl/mqtt-fedavg/client/+/status" in line
                   for line in log), log
    finally:
        broker.close()

    with Mosquitto() as plain:
        bridge = MqttBridge(coordinator, m.parse_broker_url(plain.url), m.MqttAuth())
        bridge.start(timeout=10)  # everything granted: no error
        assert bridge.publish_failures == 0
        plain.kill()
        wait_for(lambda: not bridge.connection.connected.is_set(), 10, "the bridge to notice")
        before = bridge.publish_failures  # the bridge's own status heartbeat may also have failed by now
        info = bridge.connection.publish(bridge.topics.client("board-1", "reply"), b"{}")
        assert info.rc != 0 and bridge.publish_failures >= before + 1
        assert any("could not publish on gefl/mqtt-fedavg/client/board-1/reply" in line for line in log), log
        plain.start()
        assert bridge.connection.wait_connected(30)
        bridge.stop()


def test_a_flood_of_messages_cannot_keep_the_aggregator_from_stopping_or_saying_so(tmp_path, broker, monkeypatch):
    """The bridge's queue is bounded. Once its worker had taken its last item, paho's network thread,
    putting one more flooded message, blocked for good: stop() never returned and the last round's
    tasks were never sent (1000 clients' heartbeats did that at every run's end). A tiny queue, a
    worker slower than the flood on a status topic, and the flood going on while the bridge stops make
    the same happen every time here."""
    import paho.mqtt.client as mqtt
    from gefl.aggregator import mqtt_bridge

    monkeypatch.setattr(mqtt_bridge, "QUEUE_SIZE", 2)
    coordinator = build_coordinator(config_from_dict(FEDAVG), tmp_path / "state", TOKEN)
    bridge = MqttBridge(coordinator, m.parse_broker_url(broker.url), m.MqttAuth())
    handle = bridge._on_message

    def busy(topic: str, payload: bytes) -> None:  # an aggregator busy with a round: slower than the flood
        time.sleep(0.02)
        handle(topic, payload)

    monkeypatch.setattr(bridge, "_on_message", busy)
    bridge.start(timeout=10)
    flooding = threading.Event()
    flooder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    statuses: list[bytes] = []
    flooder.on_message = lambda _c, _u, msg: statuses.append(msg.payload)
    flooder.connect("127.0.0.1", broker.port)
    flooder.loop_start()
    flooder.subscribe(bridge.topics.aggregator_status, 1)

    def flood() -> None:
        while not flooding.is_set():
            flooder.publish(bridge.topics.client("board-9", "status"), b'{"status": "alive"}', qos=0)
            time.sleep(0.0005)

    threading.Thread(target=flood, daemon=True).start()
    try:
        wait_for(lambda: bridge._queue.full(), 60, "the flood to fill the bridge's queue")
        stopper = threading.Thread(target=bridge.stop, daemon=True)
        stopper.start()
        stopper.join(120)  # it takes well under a second; before the fix it never returned
        assert not stopper.is_alive(), "MqttBridge.stop() hung under a flood of messages"
        wait_for(lambda: any(b'"offline"' in s for s in statuses), 30, "the aggregator's offline status")
    finally:
        flooding.set()
        flooder.loop_stop()
        flooder.disconnect()


# ------------------------------------------------------------------------------ 7. all of it, throughout a run
ATTACKER = r'''
import json, sys, time
import paho.mqtt.client as mqtt

host, port, fed, offline_victim, task_victim, finish_victim = sys.argv[1:7]
root = f"gefl/{fed}"
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
seen = []
client.on_message = lambda _c, _u, msg: seen.append((msg.topic, msg.payload))
client.connect(host, int(port))
client.loop_start()
client.subscribe(f"{root}/client/+/task", 1)  # every sealed task, to replay onto other clients' topics
finished = json.dumps({"id": "x:1", "status": "finished", "round": 0, "phase": "", "tier": "", "seed": 0,
                       "upload_name": "", "max_upload_bytes": 0, "deadline_s": 0, "artifacts": []}).encode()
sent = 0
while True:
    client.publish(f"{root}/client/{offline_victim}/status", b'{"status": "offline"}', qos=0)
    if sent % 10 == 0:
        client.publish(f"{root}/client/{task_victim}/task", b"[" * 60000, qos=1, retain=sent % 20 == 0)
        client.publish(f"{root}/client/{finish_victim}/task", finished, qos=1, retain=sent % 20 == 10)
        for topic, payload in seen[-3:]:
            if payload and not topic.endswith(f"/{finish_victim}/task"):
                client.publish(f"{root}/client/{finish_victim}/task", payload, qos=1)
        print(f"attacker: {sent} rounds of forgeries", flush=True)
    sent += 1
    time.sleep(0.01)
'''


def _federation_run(tmp_path: Path, label: str, attack: bool, timeout: float = 420) -> tuple[Path, str]:
    """A three-client FedAvg run through its own Mosquitto, the aggregator and the clients real `gefl`
    processes started in order (so ids, shards and task seeds are the same in every run); with
    `attack`, an attacker process forges throughout. Returns (state dir, aggregator output)."""
    from gefl.image_folder import write_split

    shards = tmp_path / "shards"
    if not shards.exists():
        write_split("fashion-mnist", 3, shards, samples_per_client=150, seed=0)
    config = tmp_path / "config.yaml"
    config.write_text("name: attacked\nalgorithm: fedavg\nnum_clients: 3\ntiers: [cnn2]\nrounds: 3\nseed: 7\n"
                      "train: {local_epochs: 1}\neval: {every: 100}\n"
                      "network: {min_clients: 3, round_timeout: 180, heartbeat_timeout: 30}\n")
    state = tmp_path / label
    broker = Mosquitto().start()
    url = broker.url + "/attacked"
    processes: list[Process] = []
    attacker = None
    try:
        aggregator = Process(["aggregator", "serve", "--config", str(config), "--mqtt", url, "--state-dir",
                              str(state)], env={"GEFL_TOKEN": TOKEN})
        processes.append(aggregator)
        aggregator.wait_line("serving", 120)
        if attack:
            with open(tmp_path / "attacker.log", "w") as log:
                attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, "127.0.0.1", str(broker.port),
                                             "attacked", "board-0", "board-1", "board-2"], stdout=log,
                                            stderr=subprocess.STDOUT)
            time.sleep(1.0)
        for i in range(3):
            client = Process(["client", "run", "--aggregator", url, "--data-dir", str(shards / f"client-00{i}"),
                              "--tier", "cnn2", "--name", f"board-{i}", "--threads", "1", "--give-up", "120",
                              "--state-dir", str(tmp_path / f"{label}-device-{i}")], env={"GEFL_TOKEN": TOKEN})
            processes.append(client)
            client.wait_line("registered with", 120)
        assert aggregator.wait(timeout) == 0, aggregator.output[-5000:]
        for client in processes[1:]:
            assert client.wait(60) == 0, client.output[-5000:]
            assert "the run is finished; this client trained 3 round(s)" in client.output, client.output[-3000:]
        if attack:
            assert attacker is not None and attacker.poll() is None, "the attacker stopped before the run ended"
            dropped = "\n".join(c.output for c in processes[1:])
            assert "not sealed by the aggregator" in dropped, dropped[-3000:]  # the brackets, the "finished"
            assert "does not verify" in dropped, dropped[-3000:]  # the replayed tasks of other clients
            assert "reconnected" not in dropped and "unexpected" not in dropped, dropped[-3000:]
            assert "forged or replayed" in aggregator.output
        return state, aggregator.output
    finally:
        for process in processes:
            process.kill()
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        broker.close()


def test_a_run_under_attack_computes_exactly_what_an_undisturbed_run_computes(tmp_path):
    from safetensors.numpy import load_file

    quiet, _ = _federation_run(tmp_path, "quiet", attack=False)
    attacked, output = _federation_run(tmp_path, "attacked", attack=True)
    assert " is offline" not in output and "running the round again" not in output, output[-5000:]
    records = [json.loads(line) for line in (attacked / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["contributors"], r["dropped"]) for r in records] == [(r, [0, 1, 2], []) for r in (1, 2, 3)]
    expected = load_file(quiet / "weights" / "cnn2.safetensors")
    got = load_file(attacked / "weights" / "cnn2.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
