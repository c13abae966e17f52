"""The README's two pictures, made by the tools themselves in headless Chromium:

    python scripts/screenshots.py report RUN_DIR     # gefl report RUN_DIR, then its index.html
    python scripts/screenshots.py status             # a 3-client loopback federation's --status page

Both write into docs/ (docs/report.png, docs/status.png). The status picture is taken after the
fourth round closes, with the clients' tiers, contributions and the accuracy curve on the page.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _shot(url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["/usr/bin/chromium", *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        "--virtual-time-budget=3000", f"--screenshot={out}", url], check=True, capture_output=True)
    print(f"wrote {out}")


def report(run_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "gefl.cli", "report", str(run_dir)], check=True)
    _shot((run_dir / "report" / "index.html").resolve().as_uri(), DOCS / "report.png", "1100,1500")


def status() -> None:
    from gefl.aggregator.grpc_server import start_server
    from gefl.aggregator.serve import build_coordinator
    from gefl.aggregator.status import StatusServer

    from gefl.config import config_from_dict
    from gefl.image_folder import write_split

    token = "screenshot-enrolment"
    cfg = config_from_dict({"name": "lab-bench", "algorithm": "gefl-f", "num_clients": 3,
                            "tiers": ["cnn2", "cnn3c", "cnn4"], "rounds": 4, "partition": {"samples_per_client": 200},
                            "train": {"local_epochs": 1}, "eval": {"every": 1},
                            "gefl": {"warmup_rounds": 2, "generator_rounds": 1, "generator": {"local_epochs": 1}}})
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        write_split("fashion-mnist", 3, work_dir / "shards", samples_per_client=200, seed=0)
        coordinator = build_coordinator(cfg, work_dir / "state", token)
        server, port, _ = start_server(coordinator, "127.0.0.1:0")
        page = StatusServer(coordinator, "127.0.0.1:0", None, work_dir / "state" / "metrics.jsonl").start()
        threading.Thread(target=coordinator.run, daemon=True).start()
        clients = [subprocess.Popen(
            [sys.executable, "-m", "gefl.cli", "client", "run", "--aggregator", f"127.0.0.1:{port}", "--data-dir",
             str(work_dir / "shards" / f"client-00{c}"), "--tier", cfg.tier_of(c), "--name", f"board-{c}",
             "--threads", "1", "--state-dir", str(work_dir / "device"), "-q"],
            env={**os.environ, "GEFL_TOKEN": token}) for c in range(3)]
        try:
            while coordinator.loop.federation.completed < 4:
                time.sleep(0.5)
            _shot(page.url, DOCS / "status.png", "1250,700")
        finally:
            coordinator.stopping.set()
            for client in clients:
                client.kill()
            page.stop()
            server.stop(grace=None)


if __name__ == "__main__":
    DOCS.mkdir(exist_ok=True)
    if sys.argv[1:2] == ["report"] and len(sys.argv) == 3:
        report(Path(sys.argv[2]))
    elif sys.argv[1:] == ["status"]:
        status()
    else:
        sys.exit(__doc__)
