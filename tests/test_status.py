"""The aggregator's live status page, in a real headless Chromium, of a live 3-client federation over
gRPC; status.json and `gefl aggregator status` for scripts; the admin token off loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gefl.aggregator.grpc_server import start_server
from gefl.aggregator.serve import build_coordinator
from gefl.aggregator.status import StatusServer, fetch_status

from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.image_folder import write_split

from netutil import TOKEN, Process, wait_for

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CONFIG = {"algorithm": "fedavg", "num_clients": 3, "tiers": ["cnn2", "cnn3", "cnn3c"], "rounds": 3,
          "partition": {"samples_per_client": 100}, "train": {"local_epochs": 1}, "eval": {"every": 1},
          "network": {"round_timeout": 120, "heartbeat_interval": 0.5}}


def _browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_the_status_page_shows_the_live_federation_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.by import By

    shards = tmp_path / "shards"
    write_split("fashion-mnist", 3, shards, samples_per_client=100, seed=0)
    cfg = config_from_dict(CONFIG)
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    status = StatusServer(coordinator, "127.0.0.1:0", None, tmp_path / "state" / "metrics.jsonl").start()
    driver = threading.Thread(target=coordinator.run, daemon=True)
    clients = [Process(["client", "run", "--aggregator", f"127.0.0.1:{port}", "--data-dir",
                        str(shards / f"client-00{c}"), "--tier", cfg.tier_of(c), "--name", f"board-{c}",
                        "--threads", "1", "--give-up", "60"], env={"GEFL_TOKEN": TOKEN}) for c in range(3)]
    browser = _browser(tmp_path / "chromium")
    try:
        # Every board registered, no round run yet: the driver starts once the page has shown them.
        wait_for(lambda: len(coordinator.clients) == 3, 120, "three registrations")
        browser.get(status.url)

        def rows() -> dict[str, tuple[str, str]]:
            """The clients table as the page shows it now (read in one script: the page redraws it every second)."""
            cells = browser.execute_script("return [...document.querySelectorAll('#clients tbody tr')]"
                                           ".map(r => [...r.cells].map(c => c.textContent))")
            return {row[1]: (row[2], row[5]) for row in cells if len(row) >= 6}

        def completed() -> int:
            return int(browser.execute_script("return document.getElementById('round').dataset.completed || '0'"))

        wait_for(lambda: len(rows()) == 3, 30, "the page to list three clients")
        assert rows() == {f"board-{c}": (cfg.tier_of(c), "online") for c in range(3)}
        assert completed() == 0
        driver.start()
        wait_for(lambda: completed() >= 1, 120, "the page's round counter to move")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#curve polyline"), 30, "the accuracy curve")

        # The same, for scripts and the terminal.
        data = fetch_status(status.url)
        assert sorted(c["name"] for c in data["clients"]) == ["board-0", "board-1", "board-2"]
        assert data["completed"] >= 1 and data["accuracy"]
        out = subprocess.run([sys.executable, "-m", "gefl.cli", "aggregator", "status", status.url],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert all(f"board-{c}" in out.stdout for c in range(3)) and "round" in out.stdout
        as_json = subprocess.run([sys.executable, "-m", "gefl.cli", "aggregator", "status", status.url, "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)["total_rounds"] == 3
        driver.join(180)
        assert coordinator.federation.finished
        final = fetch_status(status.url)
        assert final["finished"] and all(c["contributed"] == 3 for c in final["clients"]), final["clients"]
    finally:
        browser.quit()
        coordinator.stopping.set()
        for client in clients:
            client.kill()
        status.stop()
        server.stop(grace=None).wait()


def test_off_loopback_the_status_page_needs_its_admin_token(tmp_path):
    coordinator = build_coordinator(config_from_dict(CONFIG), tmp_path / "state", TOKEN)
    with pytest.raises(GeflError, match="admin token"):
        StatusServer(coordinator, "0.0.0.0:0", None, tmp_path / "m.jsonl")
    status = StatusServer(coordinator, "0.0.0.0:0", "s3cret-admin", tmp_path / "m.jsonl").start()
    try:
        url = f"http://127.0.0.1:{status.port}/status.json"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        with pytest.raises(GeflError, match="401"):
            fetch_status(f"127.0.0.1:{status.port}", "wrong")
        assert fetch_status(f"127.0.0.1:{status.port}", "s3cret-admin")["total_rounds"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{status.port}/?token=s3cret-admin", timeout=10) as page:
            assert b"status.json" in page.read()
    finally:
        status.stop()
