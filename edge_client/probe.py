"""What this device can do, so the server can hand it a tier it will actually train in time.

Everything about the hardware is read below a `root` directory rather than from `/` directly:
the boards this runs on (Raspberry Pi, Jetson, plain PCs) differ mostly in a handful of small
files, and a test can reproduce any of them as a fake tree without owning the board. Only two
things need the real machine: the CUDA query (a driver cannot be faked with files) and the
throughput measurement (which is the point of probing at all).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from gefl.errors import GeflError

if TYPE_CHECKING:
    from gefl.tiers.devices import Catalogue

MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
"""Where the device tree names the board; the second is the same node on kernels without /proc/device-tree."""

TEGRA_RELEASE = "etc/nv_tegra_release"
"""Written by NVIDIA's L4T on every Jetson, even when the device-tree model says nothing useful."""

BOARD_FAMILIES = ("raspberry-pi", "jetson", "generic")


MEASURE_SECONDS = 1.0
MEASURE_BATCH = 64
"""The batch of the tier catalogue (configs/tiers.yaml), so the two figures compare."""

_GIB = 1024**3


@dataclass
class ProbeReport:
    """What the probe measured, as it travels in a registration (bytes, the CUDA device or None).
    The policy reads it as a gefl.tiers.devices.DeviceProfile (`DeviceProfile.from_probe`)."""

    arch: str
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    board: str | None
    board_family: str
    cuda: dict | None
    train_samples_per_s: float | None

    def to_dict(self) -> dict:
        """Plain JSON types only, so `gefl probe --json` and the wire format need no encoder."""
        return asdict(self)


def probe(root: str | Path = "/", *, measure: bool = True, use_cuda: bool = True) -> ProbeReport:
    """Describe the device whose filesystem is mounted at `root` (the running machine for "/").

    A missing or unreadable file only makes the profile less specific; the probe runs on boards
    nobody has tested, and "generic" is a safe answer. A meminfo that is present but unparsable
    is different: a wrong memory figure would silently pick a wrong tier, so that raises.
    """
    root = Path(root)
    real = _is_real_root(root)
    board, family = _detect_board(root)
    total, available = _real_memory() if real else _meminfo_memory(root / "proc/meminfo")
    return ProbeReport(
        arch=(platform.machine() or "unknown") if real else _tree_arch(root),
        cpu_count=_real_cpu_count() if real else _tree_cpu_count(root),
        memory_total_bytes=total,
        memory_available_bytes=available,
        board=board,
        board_family=family,
        cuda=_cuda(real, board, family, total) if use_cuda else None,
        train_samples_per_s=measure_train_throughput() if measure else None,
    )


def _is_real_root(root: Path) -> bool:
    return os.path.realpath(root) == os.path.realpath("/")


def _read_text(path: Path) -> str | None:
    """The file's text, or None: on an unknown board an absent or root-only file is normal."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


# --- board -------------------------------------------------------------------------------------


def _detect_board(root: Path) -> tuple[str | None, str]:
    model = _device_tree_model(root)
    if model is not None and "Raspberry Pi" in model:
        return model, "raspberry-pi"
    tegra = root / TEGRA_RELEASE
    if tegra.exists() or (model is not None and ("Jetson" in model or "NVIDIA" in model)):
        return model or _tegra_board_name(_read_text(tegra) or ""), "jetson"
    return model, "generic"


def _device_tree_model(root: Path) -> str | None:
    """The board's model string; the device tree stores it NUL-terminated."""
    for relative in MODEL_FILES:
        text = _read_text(root / relative)
        if text is not None:
            model = text.split("\x00", 1)[0].strip()
            if model:
                return model
    return None


_TEGRA_LINE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\w.]+)")
_TEGRA_BOARD = re.compile(r"BOARD:\s*([^,\s]+)")


def _tegra_board_name(release: str) -> str:
    """A readable board name from L4T's release line, for Jetsons whose device tree is not visible.

    "# R36 (release), REVISION: 3.0, ..." becomes "NVIDIA Jetson (L4T R36.3.0)"; the BOARD field
    is kept when it names something ("t210ref" on a Nano), not when it is L4T's "generic".
    """
    first = release.splitlines()[0] if release.strip() else ""
    name = "NVIDIA Jetson"
    board = _TEGRA_BOARD.search(first)
    if board and board.group(1) != "generic":
        name += f" {board.group(1)}"
    version = _TEGRA_LINE.search(first)
    if version:
        name += f" (L4T R{version.group(1)}.{version.group(2)})"
    return name


# --- memory ------------------------------------------------------------------------------------


def _real_memory() -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return int(memory.total), int(memory.available)


_MEMINFO_LINE = re.compile(r"^([^:\s]+):\s*(\S+)(?:\s+(\S+))?\s*$")
_MEMINFO_KEYS = ("MemTotal", "MemAvailable", "MemFree", "Buffers", "Cached")


def _meminfo_memory(path: Path) -> tuple[int, int]:
    """(total, available) in bytes from a meminfo file; (0, 0) when the file cannot be read.

    Kernels before 3.14 have no MemAvailable; free + buffers + cache is the usual estimate there.
    """
    text = _read_text(path)
    if text is None:
        return 0, 0
    fields = _parse_meminfo(path, text)
    if "MemTotal" not in fields:
        raise GeflError(f"{path}: no MemTotal line; is this a Linux /proc/meminfo?")
    total = fields["MemTotal"]
    if "MemAvailable" in fields:
        available = fields["MemAvailable"]
    else:
        available = sum(fields.get(key, 0) for key in ("MemFree", "Buffers", "Cached"))
    return total, min(available, total)


def _parse_meminfo(path: Path, text: str) -> dict[str, int]:
    """The lines the probe uses, in bytes; a line that breaks the `Key: value kB` format raises."""
    fields: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MEMINFO_LINE.match(line)
        if match is None:
            raise _bad_meminfo(path, number, line, "expected 'Key: value kB'")
        key, value, unit = match.groups()
        if key not in _MEMINFO_KEYS:
            continue
        if not value.isdigit() or unit != "kB":
            raise _bad_meminfo(path, number, line, "expected a whole number of kB")
        fields[key] = int(value) * 1024
    return fields


def _bad_meminfo(path: Path, number: int, line: str, expected: str) -> GeflError:
    return GeflError(f"{path}, line {number}: cannot read {line.strip()!r}: {expected}")


# --- cpu and arch ------------------------------------------------------------------------------


def cpu_model(root: str | Path = "/") -> str:
    """The CPU model as cpuinfo names it (x86: "model name"; Raspberry Pi: "Model"), for reports."""
    info = _read_text(Path(root) / "proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if match := re.search(rf"^{key}\s*:\s*(.+)$", info, re.M):
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"



def _real_cpu_count() -> int:
    """The cores this process may run on: a container or taskset can allow fewer than exist."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _tree_cpu_count(root: Path) -> int:
    """Processors listed in cpuinfo, else the kernel's online range; 1 if neither says."""
    cpuinfo = _read_text(root / "proc/cpuinfo") or ""
    count = sum(1 for line in cpuinfo.splitlines() if re.match(r"processor\s*:", line))
    if count:
        return count
    return _count_cpu_list(_read_text(root / "sys/devices/system/cpu/online") or "") or 1


def _count_cpu_list(text: str) -> int:
    """Count a kernel CPU list such as "0-3" or "0,2-5"; 0 when it is not one."""
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return 0
        count += int(high) - int(low) + 1 if high else 1
    return count


def _tree_arch(root: Path) -> str:
    """The architecture a fake device tree says, so a fake aarch64 board stays aarch64.

    On the running machine the probe asks Python instead (platform.machine()): that is the view
    that matches the wheels pip installs, and under qemu-user the kernel's own file names the host."""
    text = (_read_text(root / "proc/sys/kernel/arch") or "").strip()
    return text or platform.machine() or "unknown"


# --- cuda --------------------------------------------------------------------------------------


def _cuda(real: bool, board: str | None, family: str, memory_total: int) -> dict | None:
    """The GPU the client could train on.

    A Jetson's GPU has no memory of its own: it shares the system RAM, so that total is the
    figure to plan with, whatever the driver reports. A fake tree cannot hold a driver, so there
    a Jetson's integrated GPU is inferred from the board alone.
    """
    if not real:
        if family != "jetson":
            return None
        return {"name": f"{board} (integrated)", "memory_total_bytes": memory_total, "shared_memory": True}
    import torch  # lazily: a probe with use_cuda=False should not pay for it

    try:
        if not torch.cuda.is_available():
            return None
        properties = torch.cuda.get_device_properties(0)
    except RuntimeError:  # a broken driver means no usable GPU, not a failed probe
        return None
    shared = family == "jetson"
    return {
        "name": str(properties.name),
        "memory_total_bytes": memory_total if shared else int(properties.total_memory),
        "shared_memory": shared,
    }


# --- throughput --------------------------------------------------------------------------------


def reference_tier(catalogue: Catalogue | None = None) -> str:
    """The tier whose training speed stands for the device: the one the tier catalogue
    (configs/tiers.yaml) measures every tier against, so the probe's figure and the catalogue's
    compare (and the policy's estimate of every other tier follows from it)."""
    if catalogue is None:
        catalogue = _shipped_catalogue()
    return catalogue.reference_tier


@functools.cache
def _shipped_catalogue() -> Catalogue:
    from gefl.tiers.devices import load_catalogue

    return load_catalogue()


def measure_train_throughput(seconds: float = MEASURE_SECONDS, batch_size: int = MEASURE_BATCH) -> float:
    """Training samples per second of the reference tier on this CPU, as the client would train.

    Parameter counts say little about speed on a given board (cache sizes, SIMD, thermal limits),
    so the probe times real SGD steps instead. It uses one thread, as the tier catalogue's
    measurements and the simulator's workers do, so that speed ratios between tiers carry over; a
    multi-threaded timing also collapses whenever another process holds a core. It leaves the
    caller's random state and thread count untouched.
    """
    import torch


    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_steps(seconds, batch_size)
    finally:
        torch.set_num_threads(threads)


def _time_steps(seconds: float, batch_size: int) -> float:
    import torch
    from torch.nn import functional as F

    from gefl.optim import SGD
    from gefl.tiers.models import get_model

    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        model = get_model(reference_tier()).train()
        optimizer = SGD(model.parameters(), lr=0.01, momentum=0.5)  # torch.optim would import the compiler
        batches = [(torch.randn(batch_size, 1, 32, 32), torch.randint(0, 10, (batch_size,))) for _ in range(4)]

        def step(i: int) -> None:
            images, labels = batches[i % len(batches)]
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()

        step(0)  # warm-up: the first step allocates buffers and picks kernels
        steps, start = 0, time.perf_counter()
        while True:
            step(steps)
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps * batch_size / elapsed


# --- text --------------------------------------------------------------------------------------


def format_profile(profile: ProbeReport) -> str:
    """The profile as a few aligned lines for a person at the board's terminal."""
    lines = [
        ("arch", f"{profile.arch}, {profile.cpu_count} {'core' if profile.cpu_count == 1 else 'cores'}"),
        ("memory", f"{_gib(profile.memory_total_bytes)} total, {_gib(profile.memory_available_bytes)} available"),
        ("board", f"{profile.board or 'unknown'} ({profile.board_family})"),
        ("cuda", _format_cuda(profile.cuda)),
        ("training", _format_throughput(profile.train_samples_per_s)),
    ]
    return "\n".join(f"{label:<9} {value}" for label, value in lines)


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _format_cuda(cuda: dict | None) -> str:
    if cuda is None:
        return "none"
    memory = _gib(cuda["memory_total_bytes"])
    return f"{cuda['name']}, {memory} shared with the CPU" if cuda["shared_memory"] else f"{cuda['name']}, {memory}"


def _format_throughput(samples_per_s: float | None) -> str:
    if samples_per_s is None:
        return "not measured"
    return f"{samples_per_s:,.0f} samples/s ({reference_tier()}, batch {MEASURE_BATCH}, 1 CPU thread)"
