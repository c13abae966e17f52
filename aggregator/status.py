"""The aggregator's live status: a page a person opens in a browser and `status.json` for scripts
(`gefl aggregator serve --status HOST:PORT`; `gefl aggregator status URL` prints it in a terminal).

It shows what an operator asks while a federation runs: which boards are online and since when,
what tier each trains and why, how many rounds each contributed, what was refused and why, the open
round and the time left to its deadline, and the accuracy so far. Off by default; on loopback it
needs no token, anywhere else an admin token (its own, not the enrolment token: seeing the fleet is
not joining it), checked on every request with a constant-time compare and never logged. Plain
HTTP from the standard library: the page is one self-contained file that polls status.json.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gefl.aggregator.coordinator import Coordinator

from gefl.errors import GeflError
from gefl.protocol import is_loopback

log = logging.getLogger(__name__)

STATUS_TOKEN_ENV = "GEFL_STATUS_TOKEN"
MAX_HISTORY = 2000
"""Accuracy points served at most (one per evaluated round)."""


def accuracy_history(metrics: Path) -> list[dict]:
    """The evaluated rounds of a run so far: round, phase, mean and per-tier accuracy."""
    points = []
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return points
    for line in lines[-MAX_HISTORY:]:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written right now
            continue
        if "accuracy" in record:
            points.append({"round": record["round"], "phase": record["phase"], "mean": record["mean_accuracy"],
                           "tiers": record["accuracy"]})
    return points


class StatusServer:
    """Serves `coordinator`'s status on `address` (HOST:PORT; port 0 picks a free one)."""

    def __init__(self, coordinator: Coordinator, address: str, token: str | None, metrics: Path) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise GeflError(f"--status {address!r} is not HOST:PORT (for example 127.0.0.1:8080)")
        if not is_loopback(host) and not token:
            raise GeflError(f"the status page on {host} is reachable from other machines: give it an admin token "
                            f"in {STATUS_TOKEN_ENV} (or --status-token-file), or serve it on 127.0.0.1")
        self.coordinator, self.token, self.metrics = coordinator, token, metrics
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._get(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                # The query string may carry the admin token: log the path alone.
                log.debug("status: %s %s", self.command, urllib.parse.urlsplit(self.path).path)

        try:
            self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as exc:
            raise GeflError(f"cannot serve the status page on {address}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gefl-status", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def status(self) -> dict:
        return {**self.coordinator.status(), "accuracy": accuracy_history(self.metrics)}

    def _authorised(self, request: BaseHTTPRequestHandler) -> bool:
        if not self.token:
            return True
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.startswith("Bearer ") else ""
        if not given:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
            given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _get(self, request: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(request.path).path
        if not self._authorised(request):
            self._send(request, 401, "text/plain", b"the status page needs its admin token (?token=... or a Bearer "
                                                   b"header)\n")
        elif path == "/":
            self._send(request, 200, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/status.json":
            self._send(request, 200, "application/json", json.dumps(self.status()).encode())
        else:
            self._send(request, 404, "text/plain", b"not found: / and /status.json are served\n")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, kind: str, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)


def fetch_status(url: str, token: str | None = None, timeout: float = 10.0) -> dict:
    """status.json of the aggregator whose status page is at `url`."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/status.json", "", ""))
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        hint = f"; give its admin token in {STATUS_TOKEN_ENV}" if exc.code == 401 else ""
        raise GeflError(f"the status page at {target} answered {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GeflError(f"cannot read the aggregator's status at {target}: {reason}") from None


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s ago"


def format_status(status: dict) -> str:
    """The status as `gefl aggregator status` prints it: the round, then one row per client."""
    rnd = status["round"]
    head = f"{status['federation']}: round {status['completed']}/{status['total_rounds']} completed"
    if rnd:
        head += (f"; round {rnd['number']} ({rnd['phase']}) open: {rnd['results']}/{len(rnd['participants'])} "
                 f"results, {rnd['time_left_s']:.0f}s to the deadline")
    elif status["finished"]:
        head += "; finished"
    acc = status.get("accuracy") or []
    if acc:
        head += f"; mean accuracy {acc[-1]['mean']:.2f}% after round {acc[-1]['round']}"
    rows = [head, f"{'id':>3}  {'name':<20}{'tier':<10}{'state':<9}{'since':>10}{'heartbeat':>12}{'rounds':>7}  "
                  "last refusal"]
    for c in status["clients"]:
        refusal = c["refusals"][-1] if c["refusals"] else None
        rows.append(f"{c['client_id']:>3}  {c['name']:<20}{c['tier']:<10}{'online' if c['online'] else 'offline':<9}"
                    f"{_ago(c['since_s']):>10}{_ago(c['last_seen_s']):>12}{c['contributed']:>7}  "
                    + (f"round {refusal['round']}: {refusal['reason']}" if refusal else "-"))
    return "\n".join(rows)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gefl aggregator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em;margin:0 0 .3em}
table{border-collapse:collapse;margin:.8em 0}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}.on{color:#1a7f37;font-weight:600}.off{color:#b42318;font-weight:600}
#round{font-size:1.05em}.muted{color:#777}svg{border:1px solid #ddd;background:#fcfcfc}
</style></head><body>
<h1 id="title">gefl aggregator</h1>
<div id="round" class="muted">loading status.json ...</div>
<table id="clients"><thead><tr><th>id</th><th>name</th><th>tier</th><th>why this tier</th><th>transport</th>
<th>state</th><th>since</th><th>last heartbeat</th><th>rounds contributed</th><th>refusals</th></tr></thead>
<tbody></tbody></table>
<h2 style="font-size:1.1em">Mean accuracy by round</h2>
<svg id="curve" width="640" height="220" viewBox="0 0 640 220"></svg>
<script>
"use strict";
const ago = s => s === null ? "-" : Math.round(s) + " s ago";
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function draw(points, total) {
  const svg = document.getElementById("curve"); svg.innerHTML = "";
  if (!points.length) return;
  const x = r => 40 + 590 * (r - 1) / Math.max(1, total - 1), y = a => 200 - 190 * a / 100;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(p => x(p.round) + "," + y(p.mean)).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2563eb"); line.setAttribute("stroke-width", "2");
  svg.appendChild(line);
  for (const p of points) {
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", x(p.round)); dot.setAttribute("cy", y(p.mean)); dot.setAttribute("r", 3);
    dot.setAttribute("fill", "#2563eb"); svg.appendChild(dot);
  }
  for (const a of [0, 50, 100]) {
    const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
    t.setAttribute("x", 4); t.setAttribute("y", y(a) + 4); t.textContent = a + "%"; svg.appendChild(t);
  }
}
async function refresh() {
  try {
    const reply = await fetch("status.json" + location.search, {cache: "no-store"});
    if (!reply.ok) throw new Error(reply.status + " " + reply.statusText);
    const s = await reply.json();
    document.getElementById("title").textContent = "gefl aggregator: " + s.federation;
    const r = s.round;
    document.getElementById("round").className = "";
    document.getElementById("round").textContent = "completed " + s.completed + " / " + s.total_rounds
      + (r ? " \\u2014 round " + r.number + " (" + r.phase + ") open: " + r.results + "/" + r.participants.length
        + " results, " + Math.round(r.time_left_s) + " s to the deadline" : (s.finished ? " \\u2014 finished" : ""));
    document.getElementById("round").dataset.completed = s.completed;
    const body = document.querySelector("#clients tbody"); body.innerHTML = "";
    for (const c of s.clients) {
      const row = body.insertRow(); row.dataset.name = c.name;
      cell(row, c.client_id); cell(row, c.name); cell(row, c.tier); cell(row, c.tier_reason); cell(row, c.transport);
      cell(row, c.online ? "online" : "offline", c.online ? "on" : "off"); cell(row, ago(c.since_s));
      cell(row, ago(c.last_seen_s)); cell(row, c.contributed);
      cell(row, c.refusals.map(f => "round " + f.round + ": " + f.reason).join("; ") || "-");
    }
    draw(s.accuracy, s.total_rounds);
  } catch (e) {
    document.getElementById("round").textContent = "status.json: " + e.message;
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
