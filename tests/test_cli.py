"""The command line as a user meets it: a real `gefl` process, its exit code and its words."""

import json
import os
import subprocess
import sys

import pytest


def gefl(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GEFL_NO_DOWNLOAD": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gefl.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gefl: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("dataset=imagenet", ["unknown dataset 'imagenet'", "fashion-mnist, mnist"]),
        ("tiers=[cnn2,cnn99]", ["unknown tier 'cnn99'", "cnn5c"]),
        ("algorithm=fedsgd", ["unknown algorithm 'fedsgd'", "gefl-f", "lg-fedavg"]),
        ("trian.lr=0.1", ["unknown config key 'trian'", "train"]),
        ("train.lr=-1", ["'train.lr' must be positive"]),
    ],
)
def test_bad_names_and_keys_fail_in_one_paragraph(override, needles):
    assert_user_error(gefl("simulate", "--set", override), *needles)


def test_missing_data_fails_with_the_how_to(tmp_path):
    proc = gefl("simulate", "--set", "dataset=mnist", "--out", str(tmp_path / "r"),
                env={"TORCH_HOME": str(tmp_path), "GEFL_DATA_DIR": str(tmp_path)})
    assert_user_error(proc, "no copy found", "--data-dir")


def test_missing_config_file_and_bad_data_dir(tmp_path):
    assert_user_error(gefl("simulate", "--config", str(tmp_path / "nope.yaml")), "does not exist")
    assert_user_error(gefl("simulate", "--data-dir", str(tmp_path / "absent")), "does not exist")


def test_help_describes_simulate():
    proc = gefl("simulate", "--help")
    assert proc.returncode == 0
    for flag in ("--config", "--set", "--out", "--data-dir", "--seed"):
        assert flag in proc.stdout


def test_simulate_end_to_end_with_worker_processes(tmp_path):
    out = tmp_path / "run"
    proc = gefl("simulate", "--set", "num_clients=2", "--set", "tiers=[cnn2,cnn3c]", "--set", "workers=2",
                "--set", "gefl.warmup_rounds=1", "--set", "gefl.generator_rounds=1", "--set", "rounds=1",
                "--set", "train.local_epochs=1", "--set", "gefl.generator.local_epochs=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "round   3/3" in proc.stdout and "mean" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["mean_best_acc"] > 30.0
    # a second run into the same non-empty directory is refused rather than mixing two runs
    assert_user_error(gefl("simulate", "--set", "rounds=1", "--out", str(out)), "not empty")


def test_list_shows_the_registries():
    proc = gefl("list")
    assert proc.returncode == 0
    assert "cnn5b (110,306 params)" in proc.stdout and "gefl-f" in proc.stdout and "cvae-f" in proc.stdout


def test_plaintext_off_loopback_needs_insecure_and_the_token_stays_out_of_the_log(tmp_path):
    from netutil import Process, free_port, wait_for

    # The aggregator's default address is every interface: without TLS that takes --insecure.
    assert_user_error(gefl("aggregator", "serve", "--state-dir", str(tmp_path / "a")), "without TLS on 0.0.0.0",
                      "--insecure", "gefl certs")
    assert_user_error(gefl("aggregator", "serve", "--state-dir", str(tmp_path / "b"), "--mqtt", "mqtt://broker.lan"),
                      "MQTT (mqtt://) without TLS on broker.lan", "--insecure")
    for target in ("10.1.2.3:50051", "mqtt://broker.lan:1883"):
        assert_user_error(gefl("client", "run", "--aggregator", target, "--data-dir", str(tmp_path),
                               env={"GEFL_TOKEN": "t"}), "without TLS", "--insecure")
    # With --insecure it serves; the generated enrolment token is in its file, not in the output.
    port = free_port()
    server = Process(["aggregator", "serve", "--state-dir", str(tmp_path / "c"), "--listen", f"0.0.0.0:{port}",
                      "--insecure"], env={"GEFL_TOKEN": ""})
    try:
        server.wait_line("serving gRPC on 0.0.0.0", 300)
        wait_for(lambda: (tmp_path / "c" / "enrolment-token").exists(), 30, "the token file")
        token = (tmp_path / "c" / "enrolment-token").read_text().strip()
        assert token and token not in server.output
        assert "enrolment token written to" in server.output
    finally:
        server.kill()
