"""A board install that works: `gefl certs` and a mutual-TLS federation of real processes (gRPC)
and a real Mosquitto built on its files, tokens from files (never the command line), and the
systemd unit that runs a board's client, checked by `systemd-analyze verify`."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from gefl.aggregator.certs import Layout, common_name, issue, subject_alt_names
from gefl.aggregator.mosquitto import Mosquitto
from gefl.aggregator.mqtt_bridge import MqttBridge
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.grpc_transport import GrpcClientTransport
from gefl.edge_client.mqtt_transport import MqttClientTransport
from gefl.edge_client.transport import Unavailable

from gefl.cli import SHIPPED_GEFL, build_parser, main
from gefl.config import config_from_dict
from gefl.image_folder import write_split
from gefl.protocol import TRAIN, RegisterRequest, UploadHeader
from gefl.protocol import mqtt as m
from gefl.protocol.wire import sha256
from gefl.resources import packaged

from netutil import TOKEN, Process, free_port, read_metrics, wait_for

ROOT = Path(__file__).resolve().parent.parent
GEFL = Path(sys.executable).parent / "gefl"
"""The virtualenv's gefl entry point: what a board's /opt/gefl/venv/bin/gefl is."""


def _gefl(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _token_file(path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------------ gefl certs
def test_gefl_certs_then_a_mutual_tls_federation_of_real_processes(tmp_path, capsys):
    code, out, _ = _gefl(capsys, "certs", "--out", str(tmp_path / "pki"), "--client", "board-0", "--client", "board-1")
    assert code == 0
    pki = Layout(tmp_path / "pki")
    for path in (pki.ca_cert, pki.server_cert, pki.client_cert("board-0"), pki.client_key("board-1")):
        assert f"wrote {path}" in out
    assert "gefl aggregator serve" in out and f"--client-ca {pki.ca_cert}" in out
    assert f"--cert {pki.client_cert('board-0')}" in out and "--token-file" in out

    shards = tmp_path / "shards"
    write_split("fashion-mnist", 2, shards, samples_per_client=100, seed=0)
    config = tmp_path / "config.yaml"
    config.write_text("algorithm: fedavg\nnum_clients: 2\ntiers: [cnn2]\nrounds: 2\ntrain: {local_epochs: 1}\n"
                      "eval: {every: 2}\nnetwork: {round_timeout: 120}\n")
    token = _token_file(tmp_path / "token")
    state, port = tmp_path / "state", free_port()
    no_env_token = {"GEFL_TOKEN": ""}  # the token comes from --token-file only
    aggregator = Process(["aggregator", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                          "--state-dir", str(state), "--token-file", str(token), "--tls-cert", str(pki.server_cert),
                          "--tls-key", str(pki.server_key), "--client-ca", str(pki.ca_cert)], env=no_env_token)
    processes = [aggregator]
    try:
        aggregator.wait_line("(mutual TLS)", 120)
        assert TOKEN not in aggregator.output  # a given token is not printed (only a generated one is)
        address = f"127.0.0.1:{port}"

        # Refused at the handshake: no client certificate, or one from another CA, token or not.
        with pytest.raises(Unavailable):
            GrpcClientTransport(address, TOKEN, ca=pki.ca_cert).register(
                RegisterRequest(name="no-cert", tier="cnn2", num_samples=100, label_histogram=(10,) * 10))
        stranger = issue(tmp_path / "other-pki", clients=["board-0"]).layout
        with pytest.raises(Unavailable):
            GrpcClientTransport(address, TOKEN, ca=pki.ca_cert, cert=stranger.client_cert("board-0"),
                                key=stranger.client_key("board-0")).register(
                RegisterRequest(name="board-0", tier="cnn2", num_samples=100, label_histogram=(10,) * 10))
        # A real client without a certificate never gets in, and gives up.
        intruder = Process(["client", "run", "--aggregator", address, "--data-dir", str(shards / "client-000"),
                            "--tier", "cnn2", "--name", "intruder", "--threads", "1", "--give-up", "3",
                            "--ca", str(pki.ca_cert), "--token-file", str(token)], env=no_env_token)
        processes.append(intruder)

        # localhost checks the certificate's DNS entry, 127.0.0.1 its IP entry.
        clients = [Process(["client", "run", "--aggregator", f"{host}:{port}", "--data-dir",
                            str(shards / f"client-00{i}"), "--tier", "cnn2", "--name", f"board-{i}", "--threads", "1",
                            "--give-up", "60", "--ca", str(pki.ca_cert), "--cert", str(pki.client_cert(f"board-{i}")),
                            "--key", str(pki.client_key(f"board-{i}")), "--token-file", str(token)], env=no_env_token)
                   for i, host in enumerate(["localhost", "127.0.0.1"])]
        processes += clients
        assert aggregator.wait(300) == 0, aggregator.output
        for client in clients:
            assert client.wait(60) == 0, client.output
            assert "the run is finished" in client.output
        records = read_metrics(state)
        assert [r["round"] for r in records] == [1, 2]
        assert all(len(r["contributors"]) == 2 for r in records)
        assert (state / "summary.json").is_file()
        assert "board-0" in aggregator.output and "board-1" in aggregator.output

        assert intruder.wait(120) == 2, intruder.output
        assert "gave up" in intruder.output
        assert "intruder" not in aggregator.output  # it never registered
    finally:
        for process in processes:
            process.kill()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_gefl_certs_again_with_a_new_client_adds_it_signed_by_the_same_ca(tmp_path, capsys):
    out = tmp_path / "pki"
    assert _gefl(capsys, "certs", "--out", str(out), "--server-name", "aggregator.lan", "--server-ip", "10.0.0.2",
                 "--server-ip", "fd00::2", "--client", "board-01")[0] == 0
    before = _files(out)
    assert set(before) == {"ca.crt", "ca.key", "server.crt", "server.key", "clients/board-01.crt",
                           "clients/board-01.key"}

    code, printed, _ = _gefl(capsys, "certs", "--out", str(out), "--client", "board-02", "--client", "board-01")
    assert code == 0
    after = _files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert set(after) - set(before) == {"clients/board-02.crt", "clients/board-02.key"}
    layout = Layout(out)
    assert f"wrote {layout.client_cert('board-02')}" in printed and f"kept  {layout.ca_key}" in printed
    assert f"kept  {layout.client_cert('board-01')}" in printed

    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("board-01", "board-02"):
        cert = x509.load_pem_x509_certificate(after[f"clients/{name}.crt"])
        cert.verify_directly_issued_by(ca)  # raises unless the same CA signed it
        assert common_name(cert) == name
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server = x509.load_pem_x509_certificate(after["server.crt"])
    server.verify_directly_issued_by(ca)
    assert subject_alt_names(server) == ["aggregator.lan", "10.0.0.2", "fd00::2"]
    for key in ("ca.key", "server.key", "clients/board-01.key", "clients/board-02.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600, key
    assert (out / "ca.crt").stat().st_mode & 0o777 == 0o644

    # The same names again are fine; other names for the existing server certificate are refused.
    assert _gefl(capsys, "certs", "--out", str(out), "--server-ip", "10.0.0.2", "--server-name", "aggregator.lan",
                 "--server-ip", "fd00::2")[0] == 0
    code, _, err = _gefl(capsys, "certs", "--out", str(out), "--server-name", "other.lan")
    assert code == 2 and "already exists for aggregator.lan" in err and "remove" in err
    assert _files(out) == after


def test_gefl_certs_refuses_bad_input_in_one_paragraph(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    half = tmp_path / "half"
    issue(half)
    (half / "ca.key").unlink()
    wrong_key = tmp_path / "wrong-key"
    issue(wrong_key)
    shutil.copy(issue(tmp_path / "another").layout.ca_key, wrong_key / "ca.key")
    cases = [
        (["--server-ip", "10.0.0.300"], "is not an IP address"),
        (["--server-ip", "aggregator.lan"], "host names go in --server-name"),
        (["--server-name", "10.0.0.3"], "give it with --server-ip"),
        (["--server-name", "bad_name!.lan"], "not a valid DNS name"),
        (["--client", "board/01"], "not a valid device name"),
        (["--client=-board"], "not a valid device name"),
        (["--client", "b" * 65], "common name holds at most 64"),
        (["--days", "0"], "--days must be at least 1"),
    ]
    for extra, phrase in cases:
        code, _, err = _gefl(capsys, "certs", "--out", str(tmp_path / "new"), *extra)
        assert code == 2 and phrase in err, (extra, err)
        assert err.startswith("gefl: error: ") and err.count("\n") == 1, err
        assert not (tmp_path / "new").exists()  # refused before anything is written
    for out, phrase in ((not_a_dir, "is not a directory"), (not_a_dir / "sub", "cannot create the directory"),
                        (half, "ca.key does not"), (wrong_key, "is not the key of")):
        code, _, err = _gefl(capsys, "certs", "--out", str(out), "--client", "board-9")
        assert code == 2 and phrase in err, (out, err)
    assert not (half / "clients").exists() and not (wrong_key / "clients").exists()


def _mqtt_connect(url: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> tuple[mqtt.Client, dict]:
    """A bare paho client that records whether the broker accepted it and what it received."""
    seen: dict = {"connected": threading.Event(), "messages": []}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)

    def on_connect(_c, _u, _f, reason_code, _p) -> None:
        if not reason_code.is_failure:
            seen["connected"].set()

    client.on_connect = on_connect
    client.on_message = lambda _c, _u, msg: seen["messages"].append(msg.topic)
    parsed = m.parse_broker_url(url)
    client.connect_async(parsed.host, parsed.port)
    client.loop_start()
    return client, seen


def test_mosquitto_admits_devices_by_their_gefl_certificates(tmp_path):
    """The shipped broker config with require_certificate and use_identity_as_username: the CN of a
    `gefl certs` client certificate is the MQTT username the ACL sees; no passwords at all."""
    pki = issue(tmp_path / "pki", clients=["aggregator", "board-1", "board-2"]).layout
    work = tmp_path / "mosquitto"
    (work / "certs").mkdir(parents=True)
    for source, target in ((pki.ca_cert, "ca.crt"), (pki.server_cert, "server.crt"), (pki.server_key, "server.key")):
        shutil.copy(source, work / "certs" / target)
    shutil.copy(ROOT / "configs" / "mosquitto" / "acl", work / "acl")
    port = free_port()
    conf = (ROOT / "configs" / "mosquitto" / "mosquitto.conf").read_text()
    for old, new in (("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n"),
                     ("\npassword_file passwd\n", "\n"),
                     ("\nrequire_certificate false\n", "\nrequire_certificate true\nuse_identity_as_username true\n")):
        assert old in conf
        conf = conf.replace(old, new)
    if os.geteuid() == 0:  # as root, mosquitto becomes user `mosquitto`, who cannot read pytest's private tmp dir
        conf += "\nuser root\n"
    broker = Mosquitto(port, conf, workdir=work).start()
    url = f"mqtts://127.0.0.1:{port}"
    config = {"name": "mtls", "algorithm": "fedavg", "num_clients": 1, "tiers": ["cnn2"], "rounds": 1,
              "partition": {"samples_per_client": 100},
              "network": {"min_clients": 1, "round_timeout": 120, "heartbeat_timeout": 60}}
    coordinator = build_coordinator(config_from_dict(config), tmp_path / "state", TOKEN)
    as_aggregator = m.MqttAuth(ca=pki.ca_cert, cert=pki.client_cert("aggregator"), key=pki.client_key("aggregator"))
    bridge = MqttBridge(coordinator, m.parse_broker_url(url), as_aggregator)
    bridge.start()
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    board = MqttClientTransport(m.parse_broker_url(url), TOKEN, m.MqttAuth(
        ca=pki.ca_cert, cert=pki.client_cert("board-1"), key=pki.client_key("board-1")))
    others = []
    try:
        board.register(RegisterRequest(name="board-1", tier="cnn2", num_samples=100, label_histogram=(10,) * 10))
        task = board.fetch_task(30)
        assert task.status == TRAIN
        model = bytes(board.download(task.round, task.artifacts[0]))
        header = UploadHeader(task.round, task.phase, task.upload_name, len(model), sha256(model), 100, 0.5)
        assert board.upload(header, model).endswith("accepted")

        # board-2's certificate gets it in as board-2: the aggregator's status, not board-1's task.
        topics = bridge.topics
        other, seen = _mqtt_connect(url, pki.ca_cert, pki.client_cert("board-2"), pki.client_key("board-2"))
        others.append(other)
        assert seen["connected"].wait(10)
        other.subscribe([(topics.aggregator_status, 1), (topics.client("board-1", "task"), 1)])
        wait_for(lambda: topics.aggregator_status in seen["messages"], 10, "board-2 to read the aggregator status")
        time.sleep(0.5)
        assert topics.client("board-1", "task") not in seen["messages"]
        # No certificate, or one of another CA: never connected.
        stranger = issue(tmp_path / "other", clients=["board-1"]).layout
        for cert, key in ((None, None), (stranger.client_cert("board-1"), stranger.client_key("board-1"))):
            client, seen = _mqtt_connect(url, pki.ca_cert, cert, key)
            others.append(client)
            assert not seen["connected"].wait(3), cert
    finally:
        for client in others:
            client.disconnect()
            client.loop_stop()
        board.close()
        coordinator.stopping.set()
        driver.join(10)
        bridge.stop()
        broker.close()


# ------------------------------------------------------------------------------ tokens
def test_tokens_come_from_a_file_or_the_environment_never_the_command_line(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv("GEFL_TOKEN", raising=False)
    missing_data = str(tmp_path / "no-such-data")
    run = ["client", "run", "--aggregator", "127.0.0.1:1", "--data-dir", missing_data]
    serve = ["aggregator", "serve", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"]

    for command in (run, serve):
        code, _, err = _gefl(capsys, *command, "--token", "s3cret")
        assert code == 2 and "--token is gone" in err and "GEFL_TOKEN" in err and "--token-file" in err
    code, _, err = _gefl(capsys, *run)
    assert code == 2 and "GEFL_TOKEN" in err and "--token-file" in err

    empty = _token_file(tmp_path / "empty", " \n")
    two_words = _token_file(tmp_path / "two", "GEFL_AGGREGATOR=x:1\nGEFL_CLIENT_ARGS=--name a\n")
    for command in (run, serve):
        for path, phrase in ((tmp_path / "nope", "does not exist"), (tmp_path, "is a directory"),
                             (empty, "is empty"), (two_words, "more than one word")):
            code, _, err = _gefl(capsys, *command, "--token-file", str(path))
            assert code == 2 and phrase in err and str(path) in err, (command[0], path, err)
    assert not (tmp_path / "state").exists()  # the aggregator stopped before touching its state dir

    # A good file gets the client as far as its data (it reads the data before any network traffic);
    # a world-readable one is used too, with a warning.
    for mode, warned in ((0o600, False), (0o640, False), (0o644, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gefl"):
            code, _, err = _gefl(capsys, *run, "--token-file", str(_token_file(tmp_path / "token", mode=mode)))
        assert code == 2 and "image folder" in err and missing_data in err
        assert any("readable by every user" in r.getMessage() for r in caplog.records) == warned, oct(mode)


# ------------------------------------------------------------------------------ systemd
def _unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file's sections as (key, value) lists, in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def _env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _exec_start(command: str, env: dict[str, str], credentials: str) -> list[str]:
    """ExecStart= as systemd expands it: %d, ${VAR} as one word, $VAR split on whitespace."""
    words = []
    for word in command.replace("%d", credentials).split():
        if (whole := re.fullmatch(r"\$\{(\w+)\}", word)) is not None:
            words.append(env.get(whole[1], ""))
        elif (split := re.fullmatch(r"\$(\w+)", word)) is not None:
            words += env.get(split[1], "").split()
        else:
            words.append(word)
    return words


def test_the_shipped_systemd_unit_runs_the_client_with_its_token_from_a_file(tmp_path, capsys):
    shipped = packaged("systemd/gefl-client.service").read_text()
    code, printed, _ = _gefl(capsys, "client", "service")
    assert code == 0 and printed == shipped
    code, env_text, _ = _gefl(capsys, "client", "service", "--env")
    assert code == 0 and env_text == packaged("systemd/client.env").read_text()

    unit = _unit(shipped)
    service = unit["Service"]
    command = _one(service, "ExecStart")
    words = shlex.split(command)
    assert words[0] == SHIPPED_GEFL and words[1:3] == ["client", "run"]
    assert "--token-file" in words and "--token" not in words
    assert _one(service, "Restart") == "on-failure" and _one(service, "RestartSec")
    assert _one(service, "DynamicUser") == "yes"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert _one(service, key) == value, key
    assert _one(service, "ReadOnlyPaths")
    assert _one(service, "StateDirectory") == "gefl-client"  # $STATE_DIRECTORY: the device's kept credential
    assert _one(service, "EnvironmentFile") == "/etc/gefl/client.env"
    assert _one(service, "LoadCredential") == "token:/etc/gefl/token"
    for key in ("After", "Wants"):
        assert "network-online.target" in _one(unit["Unit"], key).split()
    assert _one(unit["Install"], "WantedBy") == "multi-user.target"

    # Expanded with the shipped env file, as systemd would, ExecStart= is a valid `gefl client run`
    # whose token comes from the credentials directory; so is the env file's mutual-TLS variant.
    credentials = "/run/credentials/gefl-client.service"
    env = _env_file(env_text)
    variants = [env, {**env, "GEFL_CLIENT_ARGS": next(
        line.split("=", 1)[1] for line in env_text.splitlines() if line.startswith("#GEFL_CLIENT_ARGS="))}]
    for variables in variants:
        args = build_parser().parse_args(_exec_start(command, variables, credentials)[1:])
        assert args.func.__name__ == "_client_run"
        assert (args.aggregator, args.data_dir) == (env["GEFL_AGGREGATOR"], env["GEFL_CLIENT_DATA"])
        assert args.token_file == f"{credentials}/token" and args.token_flag is None
        assert args.name == "board-01"
    assert args.key == f"{credentials}/client.key" and args.cert and args.ca

    # With the executable of this virtualenv, systemd itself accepts the unit without a warning.
    code, rendered, _ = _gefl(capsys, "client", "service", "--gefl-path", str(GEFL))
    assert code == 0 and rendered == shipped.replace(f"\nExecStart={SHIPPED_GEFL} ", f"\nExecStart={GEFL} ")
    unit_file = tmp_path / "gefl-client.service"
    unit_file.write_text(rendered)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("systemd-analyze is not installed here: the unit was checked by parsing only")
        return
    verify = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if "gefl-client" in line]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    # And the check is real: a misspelt key is reported.
    broken = tmp_path / "broken" / "gefl-client.service"
    broken.parent.mkdir()
    broken.write_text(rendered.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    verify = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "ProtectHomes" in verify.stdout + verify.stderr
