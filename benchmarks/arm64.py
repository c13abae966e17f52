"""The gefl-edge client on 64-bit Arm, shown on an emulated Debian arm64 system (qemu-user + chroot).

What a Raspberry Pi OS 64-bit board gets is a wheel and PyPI's aarch64 builds of torch and
onnxruntime; this benchmark installs exactly that into a Debian bookworm arm64 root and runs it
under qemu-user on this x86 machine:

1. builds the wheel of this checkout (not editable);
2. debootstraps an arm64 root, installs python3 there, a venv with the wheel's `client` and
   `infer` extras and torch 2.9.1 (PyPI's aarch64 CPU build), and weighs the venv;
3. runs everything inside with /proc, /sys and /dev mounted and an aarch64 /proc/cpuinfo bound
   over the host's (onnxruntime's CPU detection crashes on the x86 one under qemu-user);
4. trains a short run here, exports two tiers (fp32 and int8) and checks that `gefl infer` gives
   the same top-3 classes on x86 and on aarch64;
5. runs `gefl probe --json` inside (arch and tier choice);
6. runs a real gRPC federation: the aggregator and two clients here, one client in the arm64 root.

Results go to benchmarks/results/arm64.json and arm64.md. Emulation is about 85x slower than the
host and roughly doubles resident memory, so the timings and sizes of processes are no board
figures: this shows that things work, not how fast.

Each step keeps its result under --work (steps/<name>.json) and the root stays where it is, so a
rerun after an interruption skips what is done; --redo STEP repeats one. Needs root (debootstrap,
chroot, mount) and takes 15-40 minutes the first time.

    .venv/bin/python benchmarks/arm64.py [--root /var/tmp/gefl-arm64/root] [--work /var/tmp/gefl-arm64/work]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from gefl.aggregator.mosquitto import free_port
from PIL import Image

from gefl.data import FASHION_CLASSES, read_idx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
TORCH = "torch==2.9.1"
PYPI = "https://pypi.org/simple"
ROOT_VENV = "/opt/gefl-venv"
ROOT_BENCH = "/opt/gefl-bench"
ROOT_CA = "etc/ssl/certs/gefl-host-ca-certificates.crt"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEPS = ("wheel", "venv", "versions", "simulate", "export", "images", "infer", "probe", "federation")

# The registration Debian's qemu-user-static ships (/usr/share/binfmts/qemu-aarch64), for hosts where
# update-binfmts cannot enable it. Flags: P keeps argv[0], F opens the interpreter now, so the chroot
# needs no copy of it.
BINFMT_AARCH64 = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
                  r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
                  r":/usr/libexec/qemu-binfmt/aarch64-binfmt-P:PF")

# Four Cortex-A72 cores, as on a Raspberry Pi 4. CPU lines only: no "Model"/"Hardware" line, so the
# probe does not believe it is on a real board.
CPUINFO_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""

# Full-precision probabilities through gefl's own torch-free classifier (`gefl infer` prints three
# decimals), so the x86/aarch64 comparison sees differences below 1e-3 too.
PROBS_SNIPPET = """
import json, sys
import numpy as np
from gefl.export.infer import Classifier, collect_images, load_image
c = Classifier(sys.argv[1])
paths = collect_images(sys.argv[2])
probs = c.probabilities(np.stack([c.preprocess(load_image(p), p) for p in paths]))
print(json.dumps({p.name: [float(v) for v in row] for p, row in zip(paths, probs)}))
"""

VERSIONS_SNIPPET = """
import json, platform, sys, time
from importlib.metadata import version
t = time.perf_counter()
import torch
torch_import_s = time.perf_counter() - t
import numpy, onnxruntime
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "onnxruntime": onnxruntime.__version__,
                  "numpy": numpy.__version__, "gefl_edge": version("gefl-edge"),
                  "torch_import_s": round(torch_import_s, 2)}))
"""

log = logging.getLogger("arm64")


class BenchError(RuntimeError):
    """A step failed; the message says which command and why."""


# --------------------------------------------------------------------------- processes


def run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing its output; fail with the command and its last lines."""
    argv = [str(c) for c in cmd]
    if not quiet:
        log.info("$ %s", " ".join("'<script>'" if "\n" in a else a for a in argv))
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} ran past {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")
    return done


def host_env(**extra: str) -> dict[str, str]:
    """This process's environment without any GEFL_TOKEN of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "GEFL_TOKEN"}
    env.update(extra)
    return env


def root_env(**extra: str) -> dict[str, str]:
    """A clean environment for commands in the root, as `env -i` gives.

    The host's PIP_* variables name a constraint file and a wheel folder that do not exist inside,
    so nothing leaks in; pip there reads plain PyPI, with the host's CA bundle copied in."""
    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": PYPI, "PIP_CERT": "/" + ROOT_CA,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180"}
    env.update(extra)
    return env


def stop(proc: subprocess.Popen, name: str, grace: float = 30.0) -> None:
    """SIGTERM a child we started, then SIGKILL it if it outlives `grace` seconds."""
    if proc.poll() is not None:
        return
    log.warning("stopping %s (pid %d)", name, proc.pid)
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- mounts


def mount_points() -> set[str]:
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field))
    return points


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    return sorted(p for p in mount_points() if p == prefix or p.startswith(prefix + "/"))


@contextlib.contextmanager
def root_mounts(root: Path, cpuinfo: Path) -> Iterator[None]:
    """/proc, /sys, /dev (and /dev/shm) in the root, and the aarch64 cpuinfo over its /proc/cpuinfo.

    Every mount this made is undone on the way out, failure or not, innermost first; a mount left by
    an earlier run that was killed is reused and undone as well."""
    root = root.resolve()
    plan: list[tuple[list[str], Path]] = [
        (["-t", "proc", "proc"], root / "proc"),
        (["-t", "sysfs", "sysfs"], root / "sys"),
        (["--bind", "/dev"], root / "dev"),
    ]
    if "/dev/shm" in mount_points():
        plan.append((["--bind", "/dev/shm"], root / "dev/shm"))  # torch's shared memory; a bind is not recursive
    plan.append((["--bind", str(cpuinfo)], root / "proc/cpuinfo"))
    done: list[Path] = []
    try:
        for args, target in plan:
            if str(target) in mount_points():
                log.info("already mounted (by an earlier run): %s", target)
            else:
                run(["mount", *args, target])
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            try:
                run(["umount", target], quiet=True)
            except BenchError:
                log.warning("umount %s failed; detaching it lazily", target)
                subprocess.run(["umount", "-l", str(target)], check=False)
        left = mounts_under(root)
        if left:
            log.warning("still mounted under %s: %s", root, ", ".join(left))


# --------------------------------------------------------------------------- parsing


def parse_infer(text: str) -> dict[str, list[tuple[str, float]]]:
    """`gefl infer --top K` output ("PATH: class p, class p, ...") as {file name: [(class, p), ...]}."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.strip().splitlines():
        path, sep, rest = line.rpartition(".png: ")
        if not sep:
            raise BenchError(f"unexpected gefl infer line: {line!r}")
        top = []
        for item in rest.split(", "):
            name, _, prob = item.rpartition(" ")
            top.append((name, float(prob)))
        out[Path(path + ".png").name] = top
    return out


def last_json(text: str) -> dict:
    """The JSON object a command printed (from its first '{' line on)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            return json.loads("\n".join(lines[i:]))
    raise BenchError(f"no JSON object in the output:\n{text[-2000:]}")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def du_bytes(path: Path) -> int:
    return int(run(["du", "-sb", path], quiet=True).stdout.split()[0])


# --------------------------------------------------------------------------- the benchmark


class Arm64Bench:
    """The steps, each cached as work/steps/<name>.json; `results` gathers them for the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root: Path = args.root.resolve()
        self.work: Path = args.work.resolve()
        self.gefl = args.host_venv / "bin" / "gefl"
        self.python = args.host_venv / "bin" / "python"
        self.tiers: list[str] = args.tiers.split(",")
        self.results: dict[str, Any] = {}
        self.walls: dict[str, float] = {}

    # ---------------------------------------------------------------- caching
    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.work / "steps" / f"{name}.json"
        if path.exists() and name not in self.args.redo:
            log.info("== %s: done before (%s), skipped", name, path)
            saved = json.loads(path.read_text())
        else:
            log.info("== %s", name)
            start = time.monotonic()
            value = fn()
            saved = {"wall_s": round(time.monotonic() - start, 1), "result": value}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved, indent=2))
            tmp.replace(path)
            log.info("== %s: %.0f s", name, saved["wall_s"])
        self.walls[name] = saved["wall_s"]
        self.results[name] = saved["result"]
        return saved["result"]

    def root_env(self, **extra: str) -> dict[str, str]:
        """root_env() with the CPU model qemu emulates.

        qemu's default model ("max") advertises extensions whose emulation torch's oneDNN JIT trips
        over: ConvTranspose2d (the generator's decoder) dies with SIGILL under qemu 7.2. A Cortex-A72,
        the Raspberry Pi 4's core (ARMv8.0, no SVE), is also the more faithful board."""
        env = root_env(**extra)
        if self.args.qemu_cpu:
            env["QEMU_CPU"] = self.args.qemu_cpu
        return env

    def chroot(self, argv: Sequence[str | Path], timeout: float | None = None,
               **env: str) -> subprocess.CompletedProcess:
        return run(["chroot", self.root, *argv], env=self.root_env(**env), timeout=timeout)

    # ---------------------------------------------------------------- 1. the wheel
    def build_wheel(self) -> dict:
        """pip wheel of a copy of the checkout's files (tracked and untracked, less what git ignores).

        Building from a copy leaves no build/ folder in the shared checkout, and no stale build/lib
        from an earlier build can slip files into the wheel."""
        src, out = self.work / "src", self.work / "wheel"
        for d in (src, out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        files = run(["git", "-C", REPO, "ls-files", "-z", "-co", "--exclude-standard"], quiet=True).stdout
        for rel in filter(None, files.split("\0")):
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
        run([self.python, "-m", "pip", "wheel", "--no-deps", "-w", out, src], timeout=600)
        wheel = next(out.glob("gefl_edge-*.whl"))
        commit = run(["git", "-C", REPO, "rev-parse", "HEAD"], quiet=True).stdout.strip()
        dirty = bool(run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], quiet=True).stdout)
        return {"wheel": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256_file(wheel), "git_commit": commit,
                "checkout_modified": dirty}

    # ---------------------------------------------------------------- 2. the arm64 root
    def host_tools(self) -> None:
        needed = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
                  "debootstrap": "debootstrap"}
        missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
        if missing:
            run(["apt-get", "update"], timeout=900)
            run(["apt-get", "install", "-y", "qemu-user-static", "binfmt-support", "debootstrap"],
                env=host_env(DEBIAN_FRONTEND="noninteractive"), timeout=1800)

    def binfmt(self) -> str:
        """Make sure the kernel hands aarch64 ELF files to qemu-aarch64; returns its registration."""
        misc = Path("/proc/sys/fs/binfmt_misc")
        if not (misc / "register").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", misc])
        entry = misc / "qemu-aarch64"
        if not entry.exists() or "enabled" not in entry.read_text():
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
        if not entry.exists():
            log.info("update-binfmts did not register qemu-aarch64; registering it directly")
            (misc / "register").write_text(BINFMT_AARCH64)
        elif "enabled" not in entry.read_text():
            entry.write_text("1")
        text = entry.read_text()
        if "enabled" not in text:
            raise BenchError(f"{entry} is not enabled:\n{text}")
        return text

    def debootstrap(self) -> dict:
        """A minbase bookworm arm64 root. debootstrap removes ROOT/debootstrap when it succeeds, so a
        root that still has it was interrupted: it is wiped (nothing may be mounted in it) and redone."""
        root = self.root
        if root == Path("/") or len(root.parts) < 3:
            raise BenchError(f"refusing to use {root} as the arm64 root: give a dedicated directory")
        complete = (root / "usr/bin/dpkg").exists() and not (root / "debootstrap").exists()
        if complete and "debootstrap" not in self.args.redo:
            log.info("== debootstrap: %s is complete, skipped", root)
            return {"root": str(root), "skipped": True}
        if root.exists() and any(root.iterdir()):
            if mounts_under(root):
                raise BenchError(f"{root} has mounts ({', '.join(mounts_under(root))}); unmount them first")
            log.info("removing the incomplete root %s", root)
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        run(["debootstrap", "--arch=arm64", "--variant=minbase", SUITE, root, MIRROR], timeout=3600)
        return {"root": str(root), "wall_s": round(time.monotonic() - start, 1)}

    def root_packages(self) -> None:
        """python3, its venv and pip, and CA certificates in the root; DNS and the host's CA bundle copied in."""
        shutil.copy2("/etc/resolv.conf", self.root / "etc/resolv.conf")
        (self.root / ROOT_CA).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2("/etc/ssl/certs/ca-certificates.crt", self.root / ROOT_CA)  # before ca-certificates exists
        packages = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
        status = subprocess.run(["chroot", self.root, "dpkg-query", "-W", "-f=${db:Status-Status}\n", *packages],
                                env=self.root_env(), capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.split() == ["installed"] * len(packages):
            log.info("root already has %s", ", ".join(packages))
            return
        self.chroot(["apt-get", "update"], timeout=1800)
        self.chroot(["apt-get", "install", "-y", "--no-install-recommends", *packages], timeout=3600)

    def copy_wheel(self) -> str:
        """The wheel into the root; returns its path there."""
        wheel = self.results["wheel"]["wheel"]
        dest = self.root / ROOT_BENCH.lstrip("/") / "wheel"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copy2(self.work / "wheel" / wheel, dest / wheel)
        return f"{ROOT_BENCH}/wheel/{wheel}"

    def sync_wheel(self) -> None:
        """After --redo wheel, put the new wheel into the root's venv (without its dependencies: torch stays),
        so that both ends of the federation run the same gefl-edge."""
        marker = self.root / ROOT_VENV.lstrip("/") / ".gefl-wheel.sha256"
        digest = sha256_file(self.work / "wheel" / self.results["wheel"]["wheel"])
        if marker.exists() and marker.read_text().strip() == digest:
            return
        log.info("the root's venv has another gefl-edge wheel: reinstalling it")
        wheel = self.copy_wheel()
        pip = f"{ROOT_VENV}/bin/pip"
        self.chroot([pip, "install", "--no-deps", "--force-reinstall", wheel], timeout=1800)
        self.chroot([pip, "install", f"{wheel}[client,infer]", TORCH], timeout=3600)  # any new dependency
        marker.write_text(digest + "\n")

    def venv(self) -> dict:
        """The venv a board would have: the wheel with `client` and `infer`, and PyPI's aarch64 torch."""
        wheel = self.copy_wheel()
        shutil.rmtree(self.root / ROOT_VENV.lstrip("/"), ignore_errors=True)
        self.chroot(["python3", "-m", "venv", ROOT_VENV])
        start = time.monotonic()
        self.chroot([f"{ROOT_VENV}/bin/pip", "install", f"{wheel}[client,infer]", TORCH], timeout=7200)
        install_s = time.monotonic() - start
        (self.root / ROOT_VENV.lstrip("/") / ".gefl-wheel.sha256").write_text(
            sha256_file(self.work / "wheel" / self.results["wheel"]["wheel"]) + "\n")
        freeze = json.loads(self.chroot([f"{ROOT_VENV}/bin/pip", "list", "--format", "json"]).stdout)
        venv = self.root / ROOT_VENV.lstrip("/")
        site = next(venv.glob("lib/python3*/site-packages"))
        biggest = sorted(((du_bytes(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)[:8]
        size = du_bytes(venv)
        log.info("venv in the root: %.0f MB", size / 1e6)
        return {"venv_bytes": size, "venv_mb": round(size / 1e6, 1), "pip_install_s": round(install_s, 1),
                "biggest": [{"name": n, "mb": round(b / 1e6, 1)} for b, n in biggest],
                "packages": {p["name"]: p["version"] for p in freeze}}

    def versions(self) -> dict:
        host = json.loads(run([self.python, "-c", VERSIONS_SNIPPET], timeout=300).stdout)
        emulated = json.loads(self.chroot([f"{ROOT_VENV}/bin/python", "-c", VERSIONS_SNIPPET], timeout=1800).stdout)
        debian = (self.root / "etc/debian_version").read_text().strip()
        qemu = run(["qemu-aarch64-static", "--version"], quiet=True).stdout.splitlines()[0]
        return {"host": {**host, "kernel": platform.release()},
                "emulated": {**emulated, "debian": debian, "qemu_cpu": self.args.qemu_cpu or "max (qemu's default)"},
                "qemu": qemu}

    # ---------------------------------------------------------------- 4. models and images
    def simulate(self) -> dict:
        out = self.work / "sim-run"
        shutil.rmtree(out, ignore_errors=True)
        run([self.gefl, "simulate", "--set", "rounds=2", "--set", "gefl.warmup_rounds=1",
             "--set", "gefl.generator_rounds=1", "--set", "workers=1", "--out", out], timeout=1800)
        summary = json.loads((out / "summary.json").read_text())
        return {"run_dir": str(out), "algorithm": summary["algorithm"], "rounds": summary["rounds"],
                "mean_best_acc": summary["mean_best_acc"], "wall_time_s": summary["wall_time_s"]}

    def export(self) -> dict:
        out = self.work / "models"
        shutil.rmtree(out, ignore_errors=True)
        run([self.gefl, "export", self.work / "sim-run", "--out", out, "--tiers", ",".join(self.tiers)], timeout=1800)
        files = {p.name: p.stat().st_size for p in sorted(out.glob("*.onnx"))}
        report = json.loads((out / "export_report.json").read_text())
        return {"files": files, "report": report}

    def images(self) -> dict:
        """The first test image of each of the first N classes, as 28x28 grayscale PNGs."""
        out = self.work / "images"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        x = read_idx(DATASET_DIR / "t10k-images-idx3-ubyte.gz")
        y = read_idx(DATASET_DIR / "t10k-labels-idx1-ubyte.gz")
        chosen: dict[int, int] = {}
        for index, label in enumerate(y.tolist()):
            if label not in chosen and len(chosen) < self.args.images:
                chosen[label] = index
        images = []
        for label, index in sorted(chosen.items()):
            name = f"test{index:05d}.png"
            Image.fromarray(x[index], mode="L").save(out / name)
            images.append({"file": name, "test_index": index, "label": FASHION_CLASSES[label]})
        return {"images": images}

    def stage(self) -> None:
        """Models and images into the root, where the emulated `gefl infer` reads them."""
        for name in ("models", "images"):
            dest = self.root / ROOT_BENCH.lstrip("/") / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(self.work / name, dest)

    # ---------------------------------------------------------------- 4. inference on both
    def infer(self) -> dict:
        labels = {i["file"]: i["label"] for i in self.results["images"]["images"]}
        out: dict[str, Any] = {}
        for tier in self.tiers:
            for kind, suffix in (("fp32", ".onnx"), ("int8", ".int8.onnx")):
                model = tier + suffix
                host_model, host_images = self.work / "models" / model, self.work / "images"
                root_model, root_images = f"{ROOT_BENCH}/models/{model}", f"{ROOT_BENCH}/images"
                start = time.monotonic()
                x86 = parse_infer(run([self.gefl, "infer", host_model, host_images, "--top", "3"]).stdout)
                x86_s = time.monotonic() - start
                start = time.monotonic()
                arm = parse_infer(self.chroot([f"{ROOT_VENV}/bin/gefl", "infer", root_model, root_images, "--top", "3"],
                                              timeout=1800).stdout)
                arm_s = time.monotonic() - start
                x86_p = json.loads(run([self.python, "-c", PROBS_SNIPPET, host_model, host_images], quiet=True).stdout)
                arm_p = json.loads(self.chroot([f"{ROOT_VENV}/bin/python", "-c", PROBS_SNIPPET, root_model,
                                                root_images], timeout=1800).stdout)
                rows = []
                for name in sorted(labels):
                    rows.append({"file": name, "label": labels[name],
                                 "x86_top3": [c for c, _ in x86[name]], "arm64_top3": [c for c, _ in arm[name]],
                                 "x86_probs": [p for _, p in x86[name]], "arm64_probs": [p for _, p in arm[name]],
                                 "same_top3": [c for c, _ in x86[name]] == [c for c, _ in arm[name]],
                                 "max_abs_prob_diff": max(abs(a - b) for a, b in zip(x86_p[name], arm_p[name]))})
                agree = sum(r["same_top3"] for r in rows)
                diff = max(r["max_abs_prob_diff"] for r in rows)
                log.info("%s %s: top-3 identical on %d/%d images, max |prob diff| %.2e", tier, kind, agree, len(rows),
                         diff)
                out[model] = {"tier": tier, "kind": kind, "images": len(rows), "same_top3": agree,
                              "max_abs_prob_diff": diff, "x86_wall_s": round(x86_s, 2),
                              "arm64_wall_s": round(arm_s, 2), "rows": rows}
        return out

    # ---------------------------------------------------------------- 5. probe
    def probe(self) -> dict:
        start = time.monotonic()
        profile = last_json(self.chroot([f"{ROOT_VENV}/bin/gefl", "probe", "--json"], timeout=1800).stdout)
        profile["wall_s"] = round(time.monotonic() - start, 1)
        profile["arch_is_aarch64"] = profile.get("arch") == "aarch64"
        if not profile["arch_is_aarch64"]:
            log.warning("gefl probe says arch %r inside the arm64 root, not aarch64", profile.get("arch"))
        log.info("probe: arch %s, tier %s (%s)", profile.get("arch"), profile.get("tier"), profile.get("reason"))
        return profile

    # ---------------------------------------------------------------- 6. a real federation
    def federation_config(self, path: Path) -> dict:
        """The quickstart shrunk to three clients on two tiers and one round per GeFL-F phase, with
        deadlines that allow for emulation (~85x slower) and its stalls."""
        cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        cfg.update({"name": "arm64-bench", "num_clients": 3, "tiers": self.args.fed_tiers.split(","),
                    "rounds": 1, "partition": {"samples_per_client": 100}, "eval": {"every": 1}})
        cfg["gefl"].update({"warmup_rounds": 1, "generator_rounds": 1})
        cfg["gefl"]["generator"]["local_epochs"] = 1
        cfg["network"] = {"min_clients": 3, "round_timeout": float(self.args.round_timeout),
                          "heartbeat_interval": 2.0, "heartbeat_timeout": float(self.args.heartbeat_timeout)}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return cfg

    def federation(self) -> dict:
        fed = self.work / "federation"
        shutil.rmtree(fed, ignore_errors=True)
        fed.mkdir(parents=True)
        cfg = self.federation_config(fed / "config.yaml")
        shards, state = fed / "shards", fed / "state"
        run([self.gefl, "data", "split", "--clients", "3", "--samples-per-client", "100", "--out", shards], timeout=600)
        arm_shard = self.root / ROOT_BENCH.lstrip("/") / "shards" / "client-002"
        shutil.rmtree(arm_shard, ignore_errors=True)
        shutil.copytree(shards / "client-002", arm_shard)
        address = f"127.0.0.1:{free_port()}"
        logs = {n: fed / f"{n}.log" for n in ("aggregator", "x86-0", "x86-1", "arm64-0")}
        procs: dict[str, subprocess.Popen] = {}
        started: dict[str, float] = {}
        ended: dict[str, float] = {}
        handles = []

        def start(name: str, argv: Sequence[str | Path], env: dict[str, str]) -> None:
            handle = logs[name].open("w")
            handles.append(handle)
            log.info("start %s: %s", name, " ".join(map(str, argv)))
            started[name] = time.monotonic()
            procs[name] = subprocess.Popen([str(a) for a in argv], env=env, stdout=handle, stderr=subprocess.STDOUT)

        t0 = time.monotonic()
        try:
            start("aggregator", [self.gefl, "aggregator", "serve", "--config", fed / "config.yaml", "--listen", address,
                                 "--state-dir", state], host_env(PYTHONUNBUFFERED="1"))
            token_file = state / "enrolment-token"
            deadline = time.monotonic() + 300
            while not (token_file.exists() and "serving" in logs["aggregator"].read_text()):
                if procs["aggregator"].poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the aggregator did not come up:\n{logs['aggregator'].read_text()[-3000:]}")
                time.sleep(1)
            token = token_file.read_text().strip()
            common = ["client", "run", "--aggregator", address, "--give-up", "900"]
            start("arm64-0", ["chroot", self.root, f"{ROOT_VENV}/bin/gefl", *common, "--data-dir",
                              f"{ROOT_BENCH}/shards/client-002", "--name", "arm64-0", "--tier", self.args.arm_tier,
                              "--threads", str(self.args.arm_threads)],
                  self.root_env(GEFL_TOKEN=token, PYTHONUNBUFFERED="1"))
            for i in range(2):
                start(f"x86-{i}", [self.gefl, *common, "--data-dir", shards / f"client-{i:03d}", "--name", f"x86-{i}",
                                   "--tier", self.args.x86_tier, "--threads", "1"],
                      host_env(GEFL_TOKEN=token, PYTHONUNBUFFERED="1"))
            deadline = time.monotonic() + self.args.federation_timeout
            last_report = 0.0
            while any(p.poll() is None for p in procs.values()):
                now = time.monotonic()
                for name, p in procs.items():
                    if p.poll() is not None and name not in ended:
                        ended[name] = now
                        log.info("%s exited %d after %.0f s", name, p.returncode, now - started[name])
                failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
                if failed:  # the aggregator would wait for a crashed client's return until the deadline
                    raise BenchError(f"{failed[0]} exited {procs[failed[0]].returncode}:\n"
                                     f"{logs[failed[0]].read_text()[-3000:]}")
                if now > deadline:
                    raise BenchError(f"the federation ran past {self.args.federation_timeout} s")
                if now - last_report > 60:
                    last_report = now
                    tail = (logs["aggregator"].read_text().strip().splitlines() or [""])[-1]
                    log.info("federation %.0f s: aggregator: %s", now - t0, tail[:160])
                time.sleep(2)
            for name in procs:
                ended.setdefault(name, time.monotonic())
        finally:
            for name in ("x86-0", "x86-1", "arm64-0", "aggregator"):
                if name in procs:
                    stop(procs[name], name)
            for handle in handles:
                handle.close()
        texts = {n: p.read_text() for n, p in logs.items()}
        summary_path = state / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        clients = {}
        for name in ("x86-0", "x86-1", "arm64-0"):
            trained = re.search(r"this client trained (\d+) round", texts[name])
            registered = re.search(r"registered with .*?: tier (\S+) \((.*)\)", texts[name])
            trained_line = r"round (\d+) \((\w+)\): trained \S+ on \d+ samples, loss ([\d.]+), ([\d.]+)s"
            rounds = [{"round": int(n), "phase": phase, "loss": float(loss), "seconds": float(sec)}
                      for n, phase, loss, sec in re.findall(trained_line, texts[name])]
            clients[name] = {"exit_code": procs[name].returncode, "wall_s": round(ended[name] - started[name], 1),
                             "rounds_trained": int(trained.group(1)) if trained else None,
                             "tier": registered.group(1) if registered else None,
                             "tier_reason": registered.group(2) if registered else None, "rounds": rounds}
        offline = [line.strip() for line in texts["aggregator"].splitlines() if "is offline" in line]
        result = {"address": address, "config": cfg, "wall_s": round(time.monotonic() - t0, 1),
                  "aggregator": {"exit_code": procs["aggregator"].returncode,
                                 "wall_s": round(ended["aggregator"] - started["aggregator"], 1)},
                  "clients": clients, "offline_lines": offline, "any_client_offline": bool(offline),
                  "summary": summary and {k: summary[k] for k in ("algorithm", "rounds", "tiers", "mean_best_acc",
                                                                  "mean_final_acc", "wall_time_s")},
                  "logs": {n: str(p) for n, p in logs.items()}}
        codes = [result["aggregator"]["exit_code"], *(c["exit_code"] for c in clients.values())]
        if any(codes) or summary is None:
            raise BenchError(f"the federation did not finish cleanly (exit codes {codes}); logs in {fed}:\n"
                             + json.dumps(result, indent=2)[:4000])
        return result

    # ---------------------------------------------------------------- the whole
    def run_all(self) -> dict:
        self.step("wheel", self.build_wheel)
        self.host_tools()
        self.results["binfmt"] = self.binfmt()
        self.results["debootstrap"] = self.debootstrap()
        cpuinfo = self.work / "cpuinfo-aarch64"
        cpuinfo.parent.mkdir(parents=True, exist_ok=True)
        cpuinfo.write_text("\n".join(CPUINFO_CORE.format(n=n) for n in range(4)))
        with root_mounts(self.root, cpuinfo):
            uname = self.chroot(["uname", "-m"]).stdout.strip()
            if uname != "aarch64":
                raise BenchError(f"uname -m in the root says {uname!r}: is qemu-aarch64 registered with binfmt_misc?")
            self.root_packages()
            self.step("venv", self.venv)
            self.sync_wheel()
            self.step("versions", self.versions)
            self.step("simulate", self.simulate)
            self.step("export", self.export)
            self.step("images", self.images)
            self.stage()
            self.step("infer", self.infer)
            self.step("probe", self.probe)
            self.step("federation", self.federation)
        return self.results


# --------------------------------------------------------------------------- the report


def report(results: dict, walls: dict[str, float]) -> tuple[dict, str]:
    versions, venv, probe, fed = results["versions"], results["venv"], results["probe"], results["federation"]
    data = {"benchmark": "arm64", "date": time.strftime("%Y-%m-%d"), "wheel": results["wheel"],
            "versions": versions, "venv": venv, "simulate": results["simulate"],
            "export": results["export"], "images": results["images"]["images"], "infer": results["infer"],
            "probe": probe, "federation": fed, "step_wall_s": walls,
            "note": "qemu-user emulation on an x86 host: about 85x slower than native and roughly double the RSS; "
                    "timings and memory are not board figures"}
    host, emu = versions["host"], versions["emulated"]
    lines = [
        "# gefl-edge on 64-bit Arm (emulated)",
        "",
        f"`benchmarks/arm64.py`, {data['date']}: Debian {emu['debian']} arm64 (debootstrap minbase) under "
        f"{versions['qemu'].split(',')[0]} (qemu-user + binfmt_misc, emulated CPU {emu['qemu_cpu']}) on an x86_64 "
        "host, with a Cortex-A72 /proc/cpuinfo bound over the host's. The wheel of this checkout "
        f"({results['wheel']['wheel']}, commit {results['wheel']['git_commit'][:10]}"
        f"{' plus uncommitted changes' if results['wheel']['checkout_modified'] else ''}) installed with the "
        f"`client` and `infer` extras and {TORCH} from PyPI into a venv.",
        "",
        "**Emulation is about 85x slower than the host and roughly doubles resident memory: the wall times "
        "below show that things work, they are not board figures.** qemu's default CPU model (`max`) is not "
        "used: under it torch's ConvTranspose2d (the generator's decoder) dies with SIGILL inside oneDNN's JIT; "
        "a Cortex-A72 (`QEMU_CPU=cortex-a72`, the Raspberry Pi 4's core) runs everything.",
        "",
        "| | host | emulated arm64 |",
        "|---|---|---|",
        f"| machine | {host['machine']} | {emu['machine']} |",
        f"| Python | {host['python']} | {emu['python']} |",
        f"| torch | {host['torch']} | {emu['torch']} |",
        f"| onnxruntime | {host['onnxruntime']} | {emu['onnxruntime']} |",
        f"| numpy | {host['numpy']} | {emu['numpy']} |",
        f"| `import torch` | {host['torch_import_s']} s | {emu['torch_import_s']} s |",
        "",
        f"**Install size** (what a Raspberry Pi OS 64-bit install weighs): the venv is **{venv['venv_mb']:.0f} MB** "
        f"({len(venv['packages'])} packages; pip install took {venv['pip_install_s']:.0f} s emulated). Largest: "
        + ", ".join(f"{b['name']} {b['mb']:.0f} MB" for b in venv["biggest"][:5]) + ".",
        "",
        "## `gefl infer --top 3`: x86 against aarch64",
        "",
        f"Tiers exported from a short quickstart run (`gefl simulate`, {results['simulate']['rounds']} rounds, "
        f"mean best accuracy {results['simulate']['mean_best_acc']:.2f} %), {len(data['images'])} Fashion-MNIST "
        "test images (28x28 PNG, one per class). Max |prob diff| is over all ten classes, from full-precision "
        "probabilities of the same classifier code.",
        "",
        "| model | images | same top-3 | max abs prob diff | x86 wall s | arm64 wall s |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results["infer"].items():
        lines.append(f"| {model} | {r['images']} | {r['same_top3']}/{r['images']} | {r['max_abs_prob_diff']:.1e} | "
                     f"{r['x86_wall_s']:.1f} | {r['arm64_wall_s']:.1f} |")
    for model, r in results["infer"].items():
        lines += ["", f"<details><summary>{model}: per image</summary>", "",
                  "| image | label | x86 top-3 | arm64 top-3 | same |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            fmt = ", ".join
            lines.append(f"| {row['file']} | {row['label']} | {fmt(row['x86_top3'])} | {fmt(row['arm64_top3'])} | "
                         f"{'yes' if row['same_top3'] else '**no**'} |")
        lines += ["", "</details>"]
    lines += [
        "",
        "## `gefl probe --json` in the root",
        "",
        f"arch **{probe.get('arch')}** ({'as it should' if probe['arch_is_aarch64'] else 'NOT aarch64: a defect'}), "
        f"{probe.get('cpu_count')} cores, measured {probe.get('train_samples_per_s', 0):.0f} training samples/s "
        f"(emulated); tier **{probe.get('tier')}**: {probe.get('reason')}",
        "",
        "## A real federation over gRPC",
        "",
        f"Aggregator and two clients on x86, one client in the arm64 root, on {fed['address']}: "
        f"{fed['config']['algorithm']}, tiers {', '.join(fed['config']['tiers'])}, "
        f"{fed['config']['gefl']['warmup_rounds']} warm-up + {fed['config']['gefl']['generator_rounds']} generator + "
        f"{fed['config']['rounds']} head round(s), 100 images per client, round timeout "
        f"{fed['config']['network']['round_timeout']:.0f} s, heartbeat timeout "
        f"{fed['config']['network']['heartbeat_timeout']:.0f} s.",
        "",
        "| process | tier | exit code | rounds trained | seconds per round (as the client prints them) | wall s |",
        "|---|---|---|---|---|---|",
        f"| aggregator (x86) | - | {fed['aggregator']['exit_code']} | - | - | {fed['aggregator']['wall_s']:.0f} |",
    ]
    for name, c in fed["clients"].items():
        per_round = ", ".join(f"{r['phase']} {r['seconds']:.1f}" for r in c.get("rounds", []))
        lines.append(f"| {name} | {c['tier']} | {c['exit_code']} | {c['rounds_trained']} | {per_round} | "
                     f"{c['wall_s']:.0f} |")
    summary = fed["summary"]
    lines += [
        "",
        f"Whole federation {fed['wall_s']:.0f} s; mean best accuracy {summary['mean_best_acc']:.2f} %, mean final "
        f"{summary['mean_final_acc']:.2f} % ("
        + ", ".join(f"{t} {v['best_acc']:.2f}" for t, v in summary["tiers"].items())
        + "; 100 images per client and one round per phase, so these only show that the rounds ran). "
        + ("No client was marked offline." if not fed["any_client_offline"] else
           f"Marked offline: {'; '.join(fed['offline_lines'])}."),
        "",
    ]
    return data, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Show the gefl-edge client on an emulated Debian arm64 system (qemu-user + chroot): install "
                    "size, x86/aarch64 inference agreement, probe, and a real federation with an aarch64 client. "
                    "Needs root. Steps already done under --work are skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/gefl-arm64/root"), help="the arm64 root")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/gefl-arm64/work"),
                        help="wheel, run, models, images, federation logs and cached step results")
    parser.add_argument("--host-venv", type=Path, default=REPO / ".venv", help="venv with gefl-edge[train] here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where arm64.json and arm64.md go")
    parser.add_argument("--tiers", default="cnn3,cnn5b", help="tiers to export and compare")
    parser.add_argument("--images", type=int, default=8, help="test images (one per class, at most 10)")
    parser.add_argument("--fed-tiers", default="cnn3,cnn4", help="tiers the federation offers")
    parser.add_argument("--x86-tier", default="cnn3", help="tier of the two x86 clients")
    parser.add_argument("--arm-tier", default="cnn4", help="tier of the aarch64 client (or auto)")
    parser.add_argument("--arm-threads", type=int, default=2, help="torch threads of the aarch64 client")
    parser.add_argument("--qemu-cpu", default="cortex-a72",
                        help="CPU model qemu-aarch64 emulates (QEMU_CPU); '' for qemu's default, max, under which "
                             "torch's ConvTranspose2d crashes")
    parser.add_argument("--round-timeout", type=float, default=3600, help="network.round_timeout, seconds")
    parser.add_argument("--heartbeat-timeout", type=float, default=300, help="network.heartbeat_timeout, seconds")
    parser.add_argument("--federation-timeout", type=float, default=3 * 3600, help="give the federation up after")
    parser.add_argument("--redo", action="append", default=[], choices=(*STEPS, "debootstrap"), metavar="STEP",
                        help=f"repeat a step even if done (repeatable): {', '.join((*STEPS, 'debootstrap'))}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        parser.error("needs root (debootstrap, chroot, mount)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the mounts are undone
    bench = Arm64Bench(args)
    try:
        results = bench.run_all()
    except BenchError as exc:
        log.error("%s", exc)
        return 1
    data, markdown = report(results, bench.walls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arm64.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "arm64.md").write_text(markdown)
    log.info("wrote %s and %s", args.out / "arm64.json", args.out / "arm64.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
