"""`gefl report RUN_DIR`: see a federation, as one HTML page and its figures.

A run directory holds numbers (metrics.jsonl, summary.json, partition.json); this module turns
them into pictures a person can read at a glance: accuracy per tier over the rounds with the
phases shaded, the training loss, the bytes each client moved, the simulated device clock and
its stragglers, who contributed to which round (and why the others did not), and what the
generator learned. `index.html` is self-contained: inline CSS, no JavaScript, the PNGs beside it
referenced by file name, so the folder can be opened from disk, mailed or archived as it is.

Figures are drawn with matplotlib's Agg renderer through its object API (a `Figure` on a
`FigureCanvasAgg`), never pyplot: nothing here touches a global backend or window, so a report
renders on a headless board or server, and inside a notebook without changing its backend.
matplotlib is imported inside the drawing functions only, so `import gefl` and `gefl infer` do not
pay for it (nor need it installed: it is the `report` extra).

A run still in progress (no summary.json yet) gets every figure its records allow, and the page
says the summary is missing.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gefl.errors import GeflError

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, never with this module
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
"""Figures are saved at this resolution with no tight bounding box, so each PNG is exactly its
FIGURE_SIZES inches times DPI pixels: a report of one run looks like a report of another."""

FIGURE_SIZES: dict[str, tuple[float, float]] = {
    "accuracy.png": (10, 5), "loss.png": (10, 4), "bytes.png": (10, 5), "devices.png": (12, 4.5),
    "participation.png": (10, 5), "compare.png": (10, 5),
}
"""Width and height in inches of each matplotlib figure."""

SAMPLES = "samples.png"
"""The generator's sample grid, drawn by gefl.samples (its size follows the dataset's classes)."""

PHASE_COLOURS = {"warmup": "#f6c89f", "generator": "#b9dfb0", "head": "#a9c8ee", "train": "#d9d9d9"}
"""Fixed colours for the phases every algorithm has, so two reports shade a phase alike."""
_OTHER_PHASE_COLOURS = ["#e6b8e6", "#f2e394", "#9fd8d8", "#e0c0a0"]

CONTRIBUTED, LATE, REFUSED, DROPPED, NOT_SAMPLED = range(5)
PARTICIPATION_STATES = {
    CONTRIBUTED: ("contributed", "#4c9a4c"),
    LATE: ("late (missed the simulated deadline)", "#f0a030"),
    REFUSED: ("refused by the aggregator", "#d04040"),
    DROPPED: ("dropped (offline or missed the real deadline)", "#606060"),
    NOT_SAMPLED: ("not sampled", "#f2f2f2"),
}
"""A client's state in one round: label and colour in participation.png."""


@dataclass
class RunFiles:
    """What a run directory holds, read and checked once."""

    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    partition: list[dict[str, Any]] | None
    config_text: str | None
    warnings: list[str] = field(default_factory=list)
    """Things the page should say (a missing summary, a half-written last line)."""

    @property
    def algorithm(self) -> str:
        if self.summary and "algorithm" in self.summary:
            return str(self.summary["algorithm"])
        for line in (self.config_text or "").splitlines():  # a run in progress: its config.yaml says
            if line.startswith("algorithm:"):
                return line.split(":", 1)[1].strip().strip("'\"")
        return "?"

    def device_of(self) -> dict[int, str]:
        """Client id -> device class name, for a --devices run whose partition.json is written."""
        return {int(p["client"]): str(p["device"]) for p in self.partition or [] if "device" in p and "client" in p}


# --------------------------------------------------------------------------- reading a run

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GeflError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeflError(f"{path} is not valid JSON ({exc}); it is written once a run finishes: was it "
                        "edited or cut short?") from None


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The metrics records of `path` (metrics.jsonl) and any warnings.

    A garbled line is an error naming the file and the line, since every figure would be wrong
    around it; the one exception is a last line with no newline yet, which a run in progress may
    be writing at this moment: it is left out with a warning.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GeflError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise GeflError(f"{path} is not text ({exc}): it should hold one JSON object per round") from None
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                raise ValueError("not a round's record (a JSON object with an integer 'round')")
        except ValueError as exc:
            if number == len(lines):  # no newline after it: still being written
                warnings.append(f"{path.name} line {number} is incomplete (the run is writing it?); left out")
                log.warning(f"{path} line {number} is incomplete; left out of the report")
                continue
            raise GeflError(f"{path} line {number} is garbled ({exc}): each line must be one round's JSON "
                            "record as gefl writes it; restore the file or remove that line") from None
        records.append(record)
    return records, warnings


def read_run(run_dir: str | Path) -> RunFiles:
    """Read and check a run directory; a GeflError says what is wrong with it."""
    path = Path(run_dir)
    if not path.is_dir():
        raise GeflError(f"{path} is not a directory; give a run directory written by `gefl simulate` or "
                        "`gefl aggregator serve` (it holds metrics.jsonl and summary.json)")
    metrics, summary_path = path / "metrics.jsonl", path / "summary.json"
    if not metrics.exists():
        found = "it has summary.json but no metrics.jsonl" if summary_path.exists() else \
            "it has neither metrics.jsonl nor summary.json"
        raise GeflError(f"{path} is not a run directory: {found} (a run writes metrics.jsonl from its first "
                        "round and summary.json when it ends)")
    records, warnings = read_records(metrics)
    if not records:
        raise GeflError(f"{metrics} has no records: the run has not finished a round yet, so there is nothing to "
                        "report")
    summary = _read_json(summary_path) if summary_path.exists() else None
    if summary is not None and not isinstance(summary, dict):
        raise GeflError(f"{summary_path} is not a JSON object; it should be a run's summary")
    if summary is None:
        warnings.insert(0, "summary.json is missing: the run is still in progress, or stopped before its last "
                        "round (`gefl simulate --resume` goes on with it); the figures show the rounds so far")
    partition_path = path / "partition.json"
    partition = _read_json(partition_path) if partition_path.exists() else None
    if partition is not None and not isinstance(partition, list):
        partition = None
    config = path / "config.yaml"
    try:
        config_text = config.read_text(encoding="utf-8") if config.exists() else None
    except (OSError, UnicodeDecodeError):
        config_text = None
    return RunFiles(path, records, summary, partition, config_text, warnings)


# --------------------------------------------------------------------------- derived series

def phase_spans(records: Sequence[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Contiguous (phase, first round, last round) spans, in round order."""
    spans: list[tuple[str, int, int]] = []
    for r in sorted(records, key=lambda r: r["round"]):
        phase = str(r.get("phase", "?"))
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], r["round"])
        else:
            spans.append((phase, r["round"], r["round"]))
    return spans


def phase_colours(phases: Iterable[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    others = iter(_OTHER_PHASE_COLOURS * 4)
    for phase in dict.fromkeys(phases):
        colours[phase] = PHASE_COLOURS.get(phase) or next(others, "#cccccc")
    return colours


def total_bytes(records: Iterable[dict[str, Any]]) -> int:
    """Bytes per client over the whole run: the sum over rounds of everything down and up."""
    return int(sum(sum(r["bytes"].get("down", {}).values()) + sum(r["bytes"].get("up", {}).values())
                   for r in records if isinstance(r.get("bytes"), dict)))


def participation(run: RunFiles) -> tuple[list[int], list[int], list[list[int]], list[dict[str, Any]]]:
    """(clients, rounds, state[client][round], non-contributions) for the records with "contributors".

    A participant that did not contribute was late (in "stragglers": its result came after the
    simulated deadline), refused (in "refused", with the aggregator's reason), or else dropped
    (no result: offline, or past the real deadline); a round every participant missed has no
    "contributors", and its participants count as late or dropped.
    """
    records = [r for r in sorted(run.records, key=lambda r: r["round"])
               if "contributors" in r or "stragglers" in r]
    known = {int(p["client"]) for p in run.partition or [] if "client" in p}
    clients = sorted(known | {int(c) for r in records for c in r.get("participants", [])})
    rounds = [int(r["round"]) for r in records]
    row = {c: i for i, c in enumerate(clients)}
    grid = [[NOT_SAMPLED] * len(rounds) for _ in clients]
    missing: list[dict[str, Any]] = []
    devices = run.device_of()
    deadline = ((run.summary or {}).get("devices") or {}).get("deadline_s")
    for j, r in enumerate(records):
        contributors = {int(c) for c in r.get("contributors", [])}
        late = {int(c) for c in r.get("stragglers", [])}
        refused = {int(c): str(why) for c, why in (r.get("refused") or {}).items()}
        for c in r.get("participants", []):
            c = int(c)
            if c in contributors:
                state, reason = CONTRIBUTED, ""
            elif c in refused:
                state, reason = REFUSED, refused[c]
            elif c in late:
                state = LATE
                reason = "late: its result came after the simulated deadline" + \
                         (f" of {deadline:g} s" if isinstance(deadline, (int, float)) else "")
            else:
                state, reason = DROPPED, "dropped: no result (offline, or missed the real deadline)"
            grid[row[c]][j] = state
            if state != CONTRIBUTED:
                missing.append({"round": r["round"], "phase": r.get("phase", "?"), "client": c,
                                "device": devices.get(c, ""), "state": state, "reason": reason})
    return clients, rounds, grid, missing


# --------------------------------------------------------------------------- drawing

def _figure(name: str, ncols: int = 1) -> tuple[Figure, Any]:
    """A new Agg figure of FIGURE_SIZES[name], not registered with pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZES[name], dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Figure, out: Path, name: str) -> Path:
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG keeps its exact size
    return path


def _shade_phases(ax: Axes, records: Sequence[dict[str, Any]]) -> list[Any]:
    """Shade each contiguous phase span; returns legend handles, one per phase."""
    from matplotlib.patches import Patch

    spans = phase_spans(records)
    colours = phase_colours(p for p, _, _ in spans)
    for phase, first, last in spans:
        ax.axvspan(first - 0.5, last + 0.5, color=colours[phase], alpha=0.45, lw=0, zorder=0)
    return [Patch(facecolor=colours[p], alpha=0.45, label=f"{p} phase") for p in colours]


def _round_axis(ax: Axes, records: Sequence[dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in records]
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def draw_accuracy(run: RunFiles, out: Path) -> Path | None:
    """Test accuracy of every tier and their mean against the round, over the shaded phases."""
    evaluated = [r for r in run.records if isinstance(r.get("accuracy"), dict) and r["accuracy"]]
    if not evaluated:
        return None
    fig, ax = _figure("accuracy.png")
    handles = _shade_phases(ax, run.records)
    tiers = list(dict.fromkeys(t for r in evaluated for t in r["accuracy"]))
    for tier in tiers:
        points = [(r["round"], r["accuracy"][tier]) for r in evaluated if tier in r["accuracy"]]
        ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=tier)
    mean = [(r["round"], r["mean_accuracy"]) for r in evaluated if "mean_accuracy" in r]
    if mean:
        ax.plot(*zip(*mean), color="black", lw=2.4, marker="o", ms=4, label="mean")
    _round_axis(ax, run.records)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{run.path.name}: accuracy per tier ({run.algorithm})")
    ax.grid(alpha=0.3)
    lines, _ = ax.get_legend_handles_labels()
    ax.legend(handles=lines + handles, fontsize=8, loc="best", ncol=2)
    return _save(fig, out, "accuracy.png")


def draw_loss(run: RunFiles, out: Path) -> Path | None:
    """Mean training loss of the round's contributors, one colour per phase (a skipped round has none).

    Each phase span is its own line: a phase trains another objective (the generator's loss is not
    the classifier's), so a line across phases would join unlike numbers. Losses that span more
    than a factor of 30 get a log scale, so the smaller phase's curve is not flattened to zero.
    """
    losses = [r for r in sorted(run.records, key=lambda r: r["round"]) if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return None
    fig, ax = _figure("loss.png")
    _shade_phases(ax, run.records)
    colours = phase_colours(p for p, _, _ in phase_spans(run.records))
    labelled: set[str] = set()
    for phase, first, last in phase_spans(run.records):
        points = [(r["round"], r["loss"]) for r in losses if first <= r["round"] <= last]
        if points:
            ax.plot(*zip(*points), color=_darker(colours[phase]), marker="o", ms=4, lw=1.4,
                    label=None if phase in labelled else f"{phase} phase")
            labelled.add(phase)
    values = [r["loss"] for r in losses]
    if min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    _round_axis(ax, run.records)
    ax.set_ylabel("training loss (mean over contributors)")
    ax.set_title(f"{run.path.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "loss.png")


def _darker(colour: str) -> str:
    from matplotlib.colors import to_hex, to_rgb

    return to_hex(tuple(0.7 * c for c in to_rgb(colour)))


def _byte_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "B"


def human_bytes(n: float) -> str:
    scale, unit = _byte_unit(n)
    return f"{n / scale:.2f} {unit}" if unit != "B" else f"{int(n)} B"


def draw_bytes(run: RunFiles, out: Path) -> Path | None:
    """Bytes per client per round, stacked by artifact: down (what a task carried) left, up right."""
    moved = [r for r in sorted(run.records, key=lambda r: r["round"]) if isinstance(r.get("bytes"), dict)]
    if not moved:
        return None
    fig, ax = _figure("bytes.png")
    largest = max(sum(r["bytes"].get(d, {}).values()) for r in moved for d in ("down", "up"))
    scale, unit = _byte_unit(largest)
    rounds = [r["round"] for r in moved]
    palettes = {"down": ["#1f5fa8", "#6fa3dc", "#a9c8ee", "#0d3b6e"],
                "up": ["#d2691e", "#f4a460", "#ffd1a3", "#8b4513"]}
    for direction, offset in (("down", -0.2), ("up", 0.2)):
        artifacts = list(dict.fromkeys(a for r in moved for a in r["bytes"].get(direction, {})))
        bottom = [0.0] * len(moved)
        for k, artifact in enumerate(artifacts):
            heights = [r["bytes"].get(direction, {}).get(artifact, 0) / scale for r in moved]
            ax.bar([x + offset for x in rounds], heights, width=0.4, bottom=bottom,
                   color=palettes[direction][k % 4], label=f"{direction}: {artifact}")
            bottom = [b + h for b, h in zip(bottom, heights)]
    _round_axis(ax, run.records)
    ax.set_ylabel(f"{unit} per client")
    ax.set_title(f"{run.path.name}: bytes per client per round (left bar down, right bar up); "
                 f"{human_bytes(total_bytes(moved))} per client in all")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, out, "bytes.png")


def draw_devices(run: RunFiles, out: Path) -> Path | None:
    """A --devices run: each round's simulated duration (against the deadline), and per device class
    how many of its client-rounds came in on time and how many late."""
    timed = [r for r in sorted(run.records, key=lambda r: r["round"]) if isinstance(r.get("simulated_s"), (int, float))]
    if not timed:
        return None
    fig, (left, right) = _figure("devices.png", ncols=2)
    colours = phase_colours(str(r.get("phase", "?")) for r in run.records)
    left.bar([r["round"] for r in timed], [r["simulated_s"] for r in timed],
             color=[_darker(colours[str(r.get("phase", "?"))]) for r in timed],
             hatch=None, edgecolor="none")
    skipped = [r for r in timed if "contributors" not in r]
    if skipped:
        left.bar([r["round"] for r in skipped], [r["simulated_s"] for r in skipped], color="none",
                 edgecolor="#d04040", hatch="//", label="skipped: every participant late")
    deadline = ((run.summary or {}).get("devices") or {}).get("deadline_s")
    if isinstance(deadline, (int, float)):
        left.axhline(deadline, color="#d04040", ls="--", lw=1.2, label=f"deadline {deadline:g} s")
    _round_axis(left, timed)
    left.set_ylabel("simulated round time (s)")
    left.set_title("simulated time per round")
    left.grid(alpha=0.3, axis="y")
    if skipped or isinstance(deadline, (int, float)):
        left.legend(fontsize=8)

    device_of = run.device_of()
    on_time: dict[str, int] = {}
    late: dict[str, int] = {}
    for r in timed:
        stragglers = {int(c) for c in r.get("stragglers", [])}
        for c in r.get("contributors", []):
            name = device_of.get(int(c), "unknown")
            on_time[name] = on_time.get(name, 0) + 1
        for c in stragglers:
            name = device_of.get(c, "unknown")
            late[name] = late.get(name, 0) + 1
    names = sorted(set(on_time) | set(late) | set(device_of.values()))
    xs = range(len(names))
    right.bar(xs, [on_time.get(n, 0) for n in names], color=PARTICIPATION_STATES[CONTRIBUTED][1], label="on time")
    right.bar(xs, [late.get(n, 0) for n in names], bottom=[on_time.get(n, 0) for n in names],
              color=PARTICIPATION_STATES[LATE][1], label="late (straggler)")
    right.set_xticks(list(xs), names)
    right.set_ylabel("client-rounds")
    right.set_title("stragglers per device class" + ("" if device_of else " (partition.json not written yet)"))
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    return _save(fig, out, "devices.png")


def draw_participation(run: RunFiles, out: Path) -> tuple[Path | None, list[dict[str, Any]]]:
    """A client x round grid of who contributed; returns the PNG and the non-contributions."""
    clients, rounds, grid, missing = participation(run)
    if not rounds or not clients:
        return None, missing
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = _figure("participation.png")
    states = sorted(PARTICIPATION_STATES)
    cmap = ListedColormap([PARTICIPATION_STATES[s][1] for s in states])
    norm = BoundaryNorm([s - 0.5 for s in states] + [states[-1] + 0.5], cmap.N)
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
              extent=(-0.5, len(rounds) - 0.5, len(clients) - 0.5, -0.5))
    device_of = run.device_of()
    step = max(1, len(clients) // 25)
    ticks = list(range(0, len(clients), step))
    ax.set_yticks(ticks, [f"{clients[i]}" + (f" {device_of[clients[i]]}" if clients[i] in device_of else "")
                          for i in ticks], fontsize=8)
    ax.set_ylabel("client")
    if len(rounds) <= 80 and len(clients) <= 80:  # a white line between cells, while cells are big enough
        ax.set_xticks([x - 0.5 for x in range(len(rounds) + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(len(clients) + 1)], minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # columns are records: label them with their round
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: str(rounds[int(x)]) if 0 <= int(x) < len(rounds) else ""))
    ax.set_xlabel("round")
    used = {s for row in grid for s in row} | {CONTRIBUTED}
    ax.legend(handles=[Patch(facecolor=PARTICIPATION_STATES[s][1], edgecolor="#999999",
                             label=PARTICIPATION_STATES[s][0]) for s in states if s in used],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{run.path.name}: participation per round")
    return _save(fig, out, "participation.png"), missing


def draw_samples(run: RunFiles, out: Path) -> tuple[Path | None, str | None]:
    """The generator's sample grid (`gefl samples`), when the run saved a generator; (path, why not)."""
    if not (run.path / "weights" / "generator.safetensors").exists():
        return None, None
    try:
        from gefl.samples import render_samples
    except ModuleNotFoundError as exc:
        return None, f"the generator's samples need {exc.name} (pip install 'gefl-edge[train]')"
    try:
        return render_samples(run.path, out / SAMPLES, data_dir=_config_data_dir(run)), None
    except GeflError as exc:
        log.warning(f"no sample grid: {exc}")
        return None, f"no sample grid: {exc}"


def _config_data_dir(run: RunFiles) -> str | None:
    """The run's data_dir (its config.yaml), for the real features a gefl-f sample grid shows."""
    if not run.config_text:
        return None
    try:
        import yaml

        value = (yaml.safe_load(run.config_text) or {}).get("data_dir")
    except Exception:  # a config.yaml that does not parse: the default data directory, as `gefl samples`
        return None
    return str(value) if value else None


def draw_comparison(runs: Sequence[RunFiles], labels: Sequence[str], out: Path) -> Path | None:
    """The runs' mean accuracy curves on one axis."""
    fig, ax = _figure("compare.png")
    drawn = False
    for run, label in zip(runs, labels):
        points = [(r["round"], r["mean_accuracy"]) for r in sorted(run.records, key=lambda r: r["round"])
                  if isinstance(r.get("mean_accuracy"), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, lw=1.6, label=label)
            drawn = True
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean test accuracy over tiers (%)")
    ax.set_title("mean accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "compare.png")


# --------------------------------------------------------------------------- the page

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1250px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.mean td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.warn { background: #fff4d6; border: 1px solid #e8c46a; padding: 0.5em 0.8em; }
.muted { color: #777; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "—"


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[object]], left: int = 1,
           classes: Sequence[str] | None = None) -> str:
    """An HTML table; the first `left` columns are text (left-aligned), the rest numbers."""
    def cell(tag: str, i: int, value: object) -> str:
        css = ' class="l"' if i < left else ""
        return f"<{tag}{css}>{_esc(value)}</{tag}>"

    head = f"<tr>{''.join(cell('th', i, h) for i, h in enumerate(header))}</tr>" if header else ""
    body = []
    for k, row in enumerate(rows):
        css = f' class="{classes[k]}"' if classes and classes[k] else ""
        body.append(f"<tr{css}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR_MARK +
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _img(path: Path, alt: str) -> str:
    return f'<p><img src="{_esc(path.name)}" alt="{_esc(alt)}"></p>'


def _summary_html(run: RunFiles) -> list[str]:
    s = run.summary
    if s is None:
        return ["<h2>Summary</h2>", "<p class=\"warn\">No summary.json: the run has not finished.</p>"]
    facts = [("algorithm", s.get("algorithm", "?")), ("dataset", s.get("dataset", "?")),
             ("rounds", s.get("rounds", "?")), ("clients", s.get("num_clients", "?")),
             ("wall time", f"{s['wall_time_s']:.1f} s" if isinstance(s.get("wall_time_s"), (int, float)) else "?"),
             ("bytes per client, all rounds", human_bytes(total_bytes(run.records)))]
    parts = ["<h2>Summary</h2>", _table(None, facts, left=1)]
    tiers = s.get("tiers") or {}
    rows: list[Sequence[object]] = [
        (t, f"{v.get('params', 0):,}", _pct(v.get("best_acc")), _pct(v.get("final_acc"))) for t, v in tiers.items()]
    rows.append(("mean", "", _pct(s.get("mean_best_acc")), _pct(s.get("mean_final_acc"))))
    parts.append(_table(["tier", "params", "best acc %", "final acc %"], rows,
                        classes=[""] * len(tiers) + ["mean"]))
    devices = s.get("devices")
    if isinstance(devices, dict) and isinstance(devices.get("device_classes"), dict):
        deadline = devices.get("deadline_s")
        parts.append(f"<p>Simulated devices: deadline {_esc(f'{deadline:g} s' if deadline is not None else 'none')}"
                     f", simulated time {_esc(devices.get('simulated_time_s', '?'))} s.</p>")
        parts.append(_table(["device class", "tiers", "clients", "median round s", "max round s", "stragglers",
                             "client-rounds"],
                            [(n, ", ".join(d.get("tiers", [])), d.get("clients"), d.get("median_round_s"),
                              d.get("max_round_s"), d.get("stragglers"), d.get("client_rounds"))
                             for n, d in devices["device_classes"].items()], left=2))
    return parts


GENERATOR_MARK = '<meta name="generator" content="gefl report">'
"""In every index.html written here: a directory holding one is a report's, whose old figures may go."""


def _clear(out: Path, written: Iterable[Path]) -> None:
    """Remove figures an earlier report left in `out` that this one does not draw (no stale pictures);
    only in a directory an earlier report wrote, never from a folder that merely has such a file."""
    try:
        earlier = GENERATOR_MARK in (out / "index.html").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        earlier = False
    if not earlier:
        return
    keep = {p.name for p in written}
    for name in [*FIGURE_SIZES, SAMPLES]:
        if name not in keep and (out / name).is_file():
            (out / name).unlink()


def _prepare(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeflError(f"cannot create the report directory {out}: {exc.strerror or exc}") from exc


def _write_index(out: Path, page: str) -> Path:
    index = out / "index.html"
    try:
        index.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise GeflError(f"cannot write {index}: {exc.strerror or exc}") from exc
    return index


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of one run (default RUN_DIR/report/) and return the path of its index.html.

    Why: metrics.jsonl answers every question about a federation but shows none; this draws what a
    person checks first (is it learning, in which phase, at what traffic, who was left out and why)
    from the files the run already wrote, with nothing to install on the viewing side.
    """
    run = read_run(run_dir)
    target = Path(out) if out is not None else run.path / "report"
    _check_matplotlib()
    _prepare(target)
    figures: list[tuple[str, Path]] = []
    for title, draw in (("Accuracy", draw_accuracy), ("Training loss", draw_loss), ("Traffic", draw_bytes),
                        ("Simulated devices", draw_devices)):
        path = draw(run, target)
        if path is not None:
            figures.append((title, path))
    participation_png, missing = draw_participation(run, target)
    samples_png, samples_note = draw_samples(run, target)
    written = [p for _, p in figures] + [p for p in (participation_png, samples_png) if p is not None]
    _clear(target, written)

    body = [f"<h1>gefl report: {_esc(run.path.name)}</h1>",
            f"<p class=\"muted\">{_esc(run.path.resolve())} &middot; {len(run.records)} round record(s), "
            f"algorithm {_esc(run.algorithm)}</p>"]
    body += [f"<p class=\"warn\">{_esc(w)}</p>" for w in run.warnings]
    body += _summary_html(run)
    for title, path in figures:
        body += [f"<h2>{_esc(title)}</h2>", _img(path, title)]
    if participation_png is not None:
        body += ["<h2>Participation</h2>", _img(participation_png, "participation per client and round")]
        if missing:
            body.append(_table(["round", "phase", "client", "device", "status", "reason"],
                               [(m["round"], m["phase"], m["client"], m["device"],
                                 PARTICIPATION_STATES[m["state"]][0].split(" (")[0], m["reason"])
                                for m in missing], left=6))
        else:
            body.append("<p>Every participant contributed to every round.</p>")
    if samples_png is not None:
        body += ["<h2>Generator samples</h2>", _img(samples_png, "the generator's samples per class")]
    elif samples_note:
        body += ["<h2>Generator samples</h2>", f"<p class=\"warn\">{_esc(samples_note)}</p>"]
    body += ["<h2>Config</h2>", f"<pre>{_esc(run.config_text)}</pre>" if run.config_text is not None
             else "<p class=\"warn\">No config.yaml in the run directory.</p>"]
    index = _write_index(target, _page(f"gefl report: {run.path.name}", body))
    log.info(f"wrote {index} ({len(written)} figure(s))")
    return index


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write a comparison of two or more runs into `out` and return the path of its index.html.

    Why: the question after a run is usually "better than what?": the same federation under
    another algorithm, seed or device mix. One axis of mean-accuracy curves and one table (accuracy,
    traffic, wall time) answer it without opening each run's report.
    """
    if len(run_dirs) < 2:
        raise GeflError(f"a comparison needs two or more run directories, got {len(run_dirs)}; "
                        "`gefl report RUN_DIR` reports one run")
    runs = [read_run(d) for d in run_dirs]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):  # runs/a/run and runs/b/run: the whole path tells them apart
        names = [str(r.path) for r in runs]
    labels = [f"{name} ({r.algorithm})" for name, r in zip(names, runs)]
    target = Path(out)
    _check_matplotlib()
    _prepare(target)
    png = draw_comparison(runs, labels, target)
    rows = []
    for run, name in zip(runs, names):
        s = run.summary or {}
        wall = s.get("wall_time_s")
        rows.append((name, run.algorithm, _pct(s.get("mean_best_acc")),
                     _pct(s.get("mean_final_acc")), human_bytes(total_bytes(run.records)),
                     f"{wall:.1f}" if isinstance(wall, (int, float)) else "— (no summary.json)"))
    body = ["<h1>gefl report: comparison</h1>"]
    for run in runs:
        body += [f"<p class=\"warn\">{_esc(run.path.name)}: {_esc(w)}</p>" for w in run.warnings]
    body += ["<h2>Runs</h2>", _table(["run", "algorithm", "mean best acc %", "mean final acc %",
                                     "bytes per client", "wall time s"], rows, left=2)]
    if png is not None:
        body += ["<h2>Mean accuracy</h2>", _img(png, "mean accuracy per round, every run")]
    else:
        body.append("<p class=\"warn\">No run has an evaluated round yet: no accuracy curves.</p>")
    index = _write_index(target, _page("gefl report: comparison", body))
    log.info(f"wrote {index} (comparing {len(runs)} runs)")
    return index


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise GeflError("gefl report draws with matplotlib, which is not installed: pip install "
                        "'gefl-edge[report]'") from None
