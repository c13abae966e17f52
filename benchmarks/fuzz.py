"""Coverage-guided fuzzing of every decoder that faces the network or a file from elsewhere.

The targets are benchmarks/fuzz/targets.py (one per decoder; their docstrings say what each feeds
to which code, and the contract: an input may be refused with the project's documented errors,
anything else that escapes, or a hang, is a crash). Each target runs under atheris (libFuzzer) in a
subprocess of its own, with the gefl modules instrumented for coverage, for --seconds:

    python benchmarks/fuzz.py                              # every target, 300 s each
    python benchmarks/fuzz.py --targets wire,mqtt_json --seconds 60
    python benchmarks/fuzz.py --make-corpus                # rewrite the committed seed corpus
    python benchmarks/fuzz.py --commit HEAD                # the committed code, not the edits in the checkout
    python benchmarks/fuzz.py --replay benchmarks/fuzz/crashes/wire/crash-...   # one input, with its traceback

Per target it reads:      benchmarks/fuzz/corpus/<target>/    the seed corpus (committed; valid inputs
                                                              made by the real encoders, --make-corpus)
and writes (not committed):
                          benchmarks/fuzz/work/<target>/      the inputs the fuzzer found that add
                                                              coverage; read again by the next run
                          benchmarks/fuzz/crashes/<target>/   each crash's input (crash-*, timeout-*,
                                                              oom-*), to replay with --replay
                          benchmarks/results/fuzz.json, .md   executions, exec/s, coverage (libFuzzer's
                                                              cov: edges and ft: features), new corpus
                                                              entries and every crash with its exception
                                                              and the line of project code that raised it

libFuzzer stops at the first crash. To find more than one per target within its time, the runner
starts it again with the crash's signature (exception type and project line) marked as known: the
child then lets inputs that end in a known crash pass, so the fuzzer looks for different ones, and
each distinct crash is reported once. A hang is caught by the targets' CPU-time watchdog as an
exception with the stuck line (libFuzzer's -timeout is the backstop); a child is held to
--rss-limit-mb by libFuzzer and to an address-space limit by the runner, so an unchecked size
fails as a MemoryError instead of taking the memory of a machine others work on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "benchmarks" / "fuzz"
CORPUS = FUZZ / "corpus"
WORK = FUZZ / "work"
CRASHES = FUZZ / "crashes"
RESULTS = ROOT / "benchmarks" / "results"

INSTRUMENT_EXTRA = {"image_folder": ["PIL"], "client_config": ["yaml"]}
"""Libraries instrumented beside gefl, for targets whose decoding is mostly theirs (in Python)."""
PREIMPORT = ["numpy", "torch", "safetensors", "safetensors.numpy", "safetensors.torch", "grpc", "google.protobuf",
             "paho.mqtt.client", "yaml", "PIL.Image"]
"""Imported before instrumenting, so that only gefl (and INSTRUMENT_EXTRA) is instrumented: torch
instrumented would take minutes to import and drown gefl's coverage in its own."""
MAX_SESSIONS = 12
"""Restarts per target after crashes; a target that crashes at once on every start stops there."""
CORPUS_LIMIT = 200 * 1024
"""Largest seed corpus per target, in bytes (it is committed)."""


# ---------------------------------------------------------------------------------------- the targets
def load_targets() -> ModuleType:
    """benchmarks/fuzz/targets.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("gefl_fuzz_targets", FUZZ / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- the seed corpus
def make_corpus(targets: ModuleType, names: list[str]) -> dict[str, int]:
    """Write each target's seed corpus: valid inputs made by the real encoders (and a few refused
    ones, to start the fuzzer next to each check). Files named valid-* must pass all the way
    through their target (tests/test_fuzz_corpus.py checks). Returns the bytes written per target."""
    seeds = corpus_inputs(targets)
    sizes = {}
    for name in names:
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for label, data in seeds[name].items():
            (folder / label).write_bytes(data)
        sizes[name] = sum(len(d) for d in seeds[name].values())
        if sizes[name] > CORPUS_LIMIT:
            raise SystemExit(f"the {name} corpus is {sizes[name]:,} bytes, more than {CORPUS_LIMIT:,}")
    return sizes


def corpus_inputs(t: ModuleType) -> dict[str, dict[str, bytes]]:
    """Each target's seeds by file name, made by the protocol's own encoders from the targets' federations."""
    import io

    import numpy as np
    import torch
    import yaml
    from gefl.aggregator.mqtt_bridge import chunk_hashes, task_message
    from gefl.protos import gefl_v1_pb2 as pb
    from PIL import Image

    from gefl.algorithms import GlobalState, generated_shape
    from gefl.config import config_from_dict, load_config, to_dict
    from gefl.generators import FEATURE, build_generator
    from gefl.protocol import TRAIN, ArtifactRef, TaskInfo
    from gefl.protocol import mqtt as m
    from gefl.protocol.wire import encode_arrays, sha256
    from gefl.resources import packaged
    from gefl.rounds.rundir import RunDir

    model, generator = t.model_federation(), t.generator_federation()
    model_bytes, generator_bytes = model.global_upload(), generator.global_upload()
    upload = {"token": t.TOKENS[0], "attempt": "0123456789abcdef", "round": 1, "phase": "train", "name": "model",
              "size": len(model_bytes), "sha256": sha256(model_bytes), "num_samples": t.SAMPLES, "loss": 0.5,
              "index": 0, "count": 1}
    registration = {"request_id": "0123456789abcdef", "enrolment_token": t.ENROL_TOKEN, "protocol_version": 1,
                    "name": "board-2", "tier": "cnn2", "profile": {}, "num_samples": t.SAMPLES,
                    "label_histogram": [t.SAMPLES // 10] * 10, "credential": ""}
    ref = ArtifactRef("model", len(model_bytes), sha256(model_bytes))
    task = task_message(TaskInfo(TRAIN, 1, "train", "cnn2", 12345, (ref,), "model", len(model_bytes) + 65536,
                                 3599.5), "a1b2c3d4:1", {ref.sha256: chunk_hashes(model_bytes)})
    # as TrainingLogic writes its config_yaml
    cfg_yaml = yaml.safe_dump(to_dict(load_config(packaged("quickstart.yaml"))), sort_keys=False)
    light_yaml = yaml.safe_dump(to_dict(load_config(packaged("paper/fmnist-gefl-f-light.yaml"))), sort_keys=False)
    reply = {"op": "register", "ok": True, "request_id": t.REQUEST_ID, "client_id": 0, "token": t.TOKENS[0],
             "tier": "cnn2", "tier_reason": "cnn2: asked for by the client", "config_yaml": cfg_yaml,
             "federation": t.FEDERATION, "heartbeat_interval_s": 2.0}
    refusal = {"op": "register", "ok": False, "request_id": t.REQUEST_ID, "code": "INVALID_ARGUMENT",
               "message": "num_samples must be positive"}
    verdict = {"op": "upload", "round": 1, "attempt": "0123456789abcdef", "ok": True,
               "message": "round 1: model accepted"}
    chunk_header = {"sha256": t.DOWNLOAD_SHA, "name": "model", "size": t.DOWNLOAD_SIZE, "index": 0, "count": 2}
    j = m.encode_json

    # tensors: every dtype the wire carries, 0-d counters, an empty tensor, metadata
    dtypes = encode_arrays({"f16": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
                            "f64": np.array([1.5, -2.0]), "i8": np.arange(-3, 3, dtype=np.int8),
                            "u8": np.arange(4, dtype=np.uint8), "b": np.array([True, False]),
                            "counter": np.zeros((), np.int64), "empty": np.zeros((0, 3), np.float32)},
                           {"gefl": json.dumps({"format": 1})})

    # checkpoints: the aggregator's own, before and in the generator phase
    checkpoints = {}
    for label, coordinator in (("valid-before-generator", t.checkpoint_logic()),
                               ("valid-generator-phase", generator.coordinator)):
        coordinator.loop.save_checkpoint()
        checkpoints[label] = coordinator.loop.checkpoint_path.read_bytes()

    # generator files, as a run directory stores them, of three families with tiny options
    logic = generator.coordinator.loop.logic
    generators = {}
    for family, options in (("cvae-f", {"widths": [4, 8], "latent": 4, "prior_components": 2}),
                            ("dcgan-f", {"noise": 8, "g_widths": [4, 4], "d_widths": [4, 4, 4]}),
                            ("ddpm-f", {"width": 8, "steps": 10})):
        preset = "light" if family == "cvae-f" else "small"
        cfg = config_from_dict({**t.GENERATOR_CONFIG, "gefl": {"generator": {
            "family": family, "preset": preset, "options": options}}})
        torch.manual_seed(0)
        net = build_generator(family, generated_shape(FEATURE, 1), 10, preset, options)
        run = RunDir(Path(tempfile.mkdtemp(dir=t._tmp())))
        run.save_weights(GlobalState({}, net.state_dict()), logic.dataset, cfg)
        generators[f"valid-{family}"] = (run.path / "weights" / "generator.safetensors").read_bytes()

    # images: 28x28 like Fashion-MNIST, as `gefl data split` writes them, and a few other formats
    rng = np.random.default_rng(0)

    def image(mode: str, fmt: str) -> bytes:
        shape = (28, 28) if mode == "L" else (28, 28, 3)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, fmt)
        return buffer.getvalue()

    png, suffixes = image("L", "PNG"), list(t.IMAGE_SUFFIXES)
    folders = [b"00-t-shirt-top", b"01-trouser", b"02-pullover"]

    grpc_register = pb.RegisterRequest(protocol_version=1, name="board-2", tier="cnn2", num_samples=t.SAMPLES,
                                       label_histogram=[t.SAMPLES // 10] * 10).SerializeToString()
    grpc_auto = pb.RegisterRequest(protocol_version=1, name="board-3", tier="auto", num_samples=t.SAMPLES,
                                   profile=pb.DeviceProfile(arch="aarch64", cpu_count=4, memory_total_bytes=4 << 30,
                                                            memory_available_bytes=3 << 30, board="Raspberry Pi 4",
                                                            board_family="raspberry-pi", train_samples_per_s=900.0)
                                   ).SerializeToString()
    grpc_header = pb.UploadMessage(header=pb.UploadHeader(
        round=1, phase="train", name="model", size=len(model_bytes), sha256=sha256(model_bytes),
        num_samples=t.SAMPLES, loss=0.5)).SerializeToString()
    grpc_chunk = pb.UploadMessage(chunk=pb.Chunk(index=0, data=model_bytes)).SerializeToString()

    return {
        "wire": {"valid-cnn2-state": model_bytes, "valid-generator-float16": generator_bytes,
                 "valid-dtypes": dtypes, "valid-empty": encode_arrays({})},
        "mqtt_frame": {"valid-result-chunk": m.encode_frame(upload, b"\x00" * 64),
                       "valid-artifact-chunk": m.encode_frame(chunk_header, bytes(range(256))),
                       "valid-empty-body": m.encode_frame({"sha256": t.DOWNLOAD_SHA, "index": 1}, b"")},
        "mqtt_json": {"valid-registration": j(registration), "valid-heartbeat": j({"status": "alive",
                                                                                  "token": t.TOKENS[0]}),
                      "valid-task": j(task), "valid-reply": j(reply), "valid-verdict": j(verdict),
                      "valid-offline": j({"status": "offline"})},
        "mqtt_topic": {"valid-result": b"gefl/fuzz/client/board-0/result",
                       "valid-status": b"gefl/fuzz/client/board-0/status",
                       "valid-odd-name": b"gefl/fuzz/client/a.b:c@d-e_1/reply",
                       "valid-register": b"gefl/fuzz/client/board-2/register",
                       "refused-root-register": b"gefl/fuzz/register"},
        "client_task": {"valid-train": j(task), "valid-wait": j({**task, "status": "wait", "artifacts": []}),
                        "valid-finished": j({**task, "status": "finished"})},
        "client_messages": {
            "valid-task": t.client_input("task", j(task)),
            "valid-verdict": t.client_input("reply", j(verdict)),
            "valid-chunk-0": t.client_input("chunk", m.encode_frame(chunk_header, bytes(range(256))), 0),
            "valid-chunk-1": t.client_input("chunk", m.encode_frame({**chunk_header, "index": 1}, b"\xff" * 64), 1),
            "valid-registration-reply": t.client_input("register", j(reply)),
            "refused-registration": t.client_input("register", j(refusal)),
            "dropped-unsealed-task": t.client_input("raw", j(task), t.RAW_TOPICS.index("task")),
            "dropped-current": t.client_input("raw", j({"round": 1, "tiers": {"cnn2": [task["artifacts"][0]]}}),
                                              t.RAW_TOPICS.index("current")),
        },
        "client_config": {"valid-quickstart": cfg_yaml.encode(), "valid-gefl-f-light": light_yaml.encode()},
        "bridge_header": {"valid-result-chunk": m.encode_frame(upload, b"\x00" * 64),
                          "valid-second-chunk": m.encode_frame({**upload, "index": 1, "count": 2,
                                                                "size": 1 << 21}, b"")},
        "bridge_messages": {
            "valid-registration": t.bridge_input("register", j(registration), "board-2"),
            "valid-registration-again": t.bridge_input("register", j({**registration, "name": "board-0",
                                                                      "credential": t.TOKENS[0]}), "board-0"),
            "valid-upload": t.bridge_input("result", m.encode_frame(upload, model_bytes)),
            "valid-heartbeat": t.bridge_input("status", j({"status": "alive", "token": t.TOKENS[0],
                                                           "session": "0" * 16, "task": ""})),
            # refused: a last will counts only for the session a heartbeat announced (none here)
            "dropped-offline": t.bridge_input("status", m.offline_message(m.key_of(t.TOKENS[0]), "0" * 16, "board-0")),
            "refused-not-a-participant": t.bridge_input("result-1", m.encode_frame(
                {**upload, "token": t.TOKENS[1]}, model_bytes[:64])),
            "refused-topic": t.bridge_input("topic", j({"status": "alive"}), "client/board-0/task"),
        },
        "coordinator_upload": {
            "valid-model": t.envelope_input({}, model_bytes),
            "valid-generator": t.envelope_input({"federation": "generator"}, generator_bytes),
            "valid-explicit-header": t.envelope_input(
                {"federation": "generator", "client": 0, "round": 2, "phase": "generator", "name": "generator",
                 "size": len(generator_bytes), "sha256": sha256(generator_bytes), "num_samples": t.SAMPLES,
                 "loss": 1.25}, generator_bytes),
            "refused-not-a-participant": t.envelope_input({"client": 1}, generator_bytes[:256]),
        },
        "grpc_service": {
            "valid-register": t.grpc_input("register", [grpc_register]),
            "valid-register-auto": t.grpc_input("register", [grpc_auto]),
            "valid-download": t.grpc_input("download", [pb.DownloadRequest(round=1, name="model")
                                                        .SerializeToString()]),
            "valid-heartbeat": t.grpc_input("heartbeat", [pb.HeartbeatRequest(round=1).SerializeToString()] * 3),
            "valid-upload": t.grpc_input("upload", [grpc_header, grpc_chunk]),
            "refused-wrong-token": t.grpc_input("download", [pb.DownloadRequest(round=1, name="model")
                                                             .SerializeToString()], wrong_token=True),
        },
        "checkpoint": checkpoints,
        "generator_file": generators,
        "image_folder": {
            "valid-png-28x28": t.image_folder_input(None, folders[:1], [(0, 0, b"00042", png)]),
            "valid-three-classes": t.image_folder_input(1, folders, [
                (0, 0, b"00001", png), (2, suffixes.index(".jpg"), b"00007", image("L", "JPEG")),
                (2, len(suffixes), b"00003", image("L", "PNG"))]),
            "valid-rgb": t.image_folder_input(3, folders[:2], [
                (0, suffixes.index(".bmp"), b"a", image("RGB", "BMP")),
                (1, suffixes.index(".gif"), b"b", image("L", "GIF")),
                (1, len(suffixes) + 2, b"notes.txt", b"not an image")]),
            "valid-link-to-an-image": t.image_folder_input(None, folders[:2], [
                (0, 0, b"00001", png), (0, len(suffixes) + 1, b"00002", b"00001.png")]),
            "refused-link-loop": t.image_folder_input(None, folders[:2], [
                (1, 0, b"00001", png), (1, len(suffixes) + 1, b"loop", b".."), (1, len(suffixes) + 1, b"up", b".")]),
        },
    }


# ---------------------------------------------------------------------------------------- the child
def child(name: str, fuzzer_args: list[str]) -> None:
    """One fuzzing session of one target, in this process: libFuzzer's main loop via atheris."""
    import resource

    limit = int(os.environ.get("GEFL_FUZZ_AS_MB", "0"))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit << 20, limit << 20))
    extra = INSTRUMENT_EXTRA.get(name, [])
    for module in PREIMPORT:
        if not any(module == e or module.startswith(e + ".") for e in extra):
            __import__(module)
    import torch

    torch.set_num_threads(1)  # two shared cores: one fuzzing process, one thread
    import atheris

    with atheris.instrument_imports(include=["gefl", *extra]):
        targets = load_targets()
        if "PIL" in extra:
            from PIL import Image

            Image.init()  # the format plugins, imported here so that they are instrumented too
    targets.prepare(name)
    known = set(json.loads(os.environ.get("GEFL_FUZZ_KNOWN", "[]")))
    report = Path(os.environ["GEFL_FUZZ_REPORT"])
    artifacts = Path(os.environ["GEFL_FUZZ_ARTIFACTS"])
    ignored = 0

    def one(data: bytes) -> None:
        nonlocal ignored
        try:
            targets.replay(name, data)
        except BaseException as exc:
            site = targets.crash_site(exc)
            if isinstance(exc, targets.Hang):  # where a hang is interrupted varies: one signature per target
                site["signature"] = f"Hang@{name}"
            if site["signature"] in known:
                ignored += 1
                return
            # The input too, in case the process dies before libFuzzer writes its own copy (as it
            # may when its -timeout alarm arrives while a hang is being reported).
            copy = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
            copy.write_bytes(data)
            report.write_text(json.dumps({**site, "input_size": len(data), "ignored_known": ignored,
                                          "artifact": str(copy)}))
            raise

    print(f"gefl-fuzz: ready {time.time():.3f}", file=sys.stderr, flush=True)
    atheris.Setup([sys.argv[0], *fuzzer_args], one)
    atheris.Fuzz()


# ---------------------------------------------------------------------------------------- the parent
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_ERROR = re.compile(r"ERROR: libFuzzer: ([\w -]+)")
_PY_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def parse_session(text: str) -> dict[str, Any]:
    """What one libFuzzer session printed: executions, coverage, new units, the crash if any."""
    out: dict[str, Any] = {"executions": 0, "cov": 0, "ft": 0, "corpus": 0, "new_units": 0, "error": None,
                           "artifact": None, "ready": None, "traceback": ""}
    stats: dict[str, int] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := _STATUS.match(line):
            out["executions"] = int(match[1])
            out["cov"], out["ft"], out["corpus"] = int(match[3]), int(match[4]), int(match[5])
        elif match := _STAT.match(line):
            stats[match[1]] = int(match[2])
        elif match := _ARTIFACT.search(line):
            out["artifact"] = match[1]
        elif (match := _ERROR.search(line)) and out["error"] is None:
            out["error"] = match[1].strip()
        elif line.startswith("gefl-fuzz: ready "):
            out["ready"] = float(line.split()[-1])
        elif "=== Uncaught Python exception: ===" in line or "=== Timeout:" in line:
            out["traceback"] = "\n".join(lines[i:i + 40])
    out["executions"] = stats.get("number_of_executed_units", out["executions"])
    out["new_units"] = stats.get("new_units_added", 0)
    out["peak_rss_mb"] = stats.get("peak_rss_mb", 0)
    return out


def _python_site(traceback_text: str, source: Path | None) -> str:
    """The innermost project frame of a Python stack libFuzzer printed (a timeout's, most recent first)."""
    frames = [(f, int(n)) for f, n in _PY_FRAME.findall(traceback_text)]
    if "=== Timeout:" in traceback_text:
        frames.reverse()
    own = []
    for file, line in frames:
        path = Path(file)
        if source is not None and path.is_relative_to(source):
            rel = path.relative_to(source)
            own.append((Path(*rel.parts[1:]) if rel.parts[1:2] and rel.parts[1] in PACKAGE_DIRS else rel, line))
        elif path.is_relative_to(ROOT) and not path.is_relative_to(FUZZ) and not path.is_relative_to(ROOT / ".venv"):
            own.append((path.relative_to(ROOT), line))
    return f"{own[-1][0].as_posix()}:{own[-1][1]}" if own else "?"


PACKAGE_DIRS = ("aggregator", "edge_client", "export", "protos", "configs")
"""The top-level folders that install inside gefl (setuptools' package-dir in pyproject.toml)."""


def snapshot(rev: str, into: Path) -> str:
    """The package as commit `rev` has it, under `into` laid out as the wheel installs it (gefl/ with
    aggregator/, edge_client/, ... inside), so a child with PYTHONPATH=into imports that commit's
    code and not the checkout's: a fuzzing run judges one coherent version while files are being
    edited. Returns the commit's hash."""
    import io
    import tarfile

    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "gefl", *PACKAGE_DIRS], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for sub in PACKAGE_DIRS:
        (into / sub).rename(into / "gefl" / sub)
    return commit


def _preview(path: Path) -> str:
    data = path.read_bytes()
    text = data[:96].decode("latin-1").encode("unicode_escape").decode()
    return f"{len(data):,} bytes: {text}{'...' if len(data) > 96 else ''}"


def fuzz_target(name: str, seconds: int, rss_limit_mb: int, as_limit_mb: int, timeout: int,
                source: Path | None = None) -> dict[str, Any]:
    """Fuzz one target for `seconds` of fuzzing, restarting after each new crash (see the docstring)."""
    seeds, work, crashes_dir = CORPUS / name, WORK / name, CRASHES / name
    work.mkdir(parents=True, exist_ok=True)
    crashes_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in work.iterdir()}
    known: list[str] = []
    crashes: list[dict[str, Any]] = []
    result: dict[str, Any] = {"target": name, "seconds": 0.0, "wall_s": 0.0, "sessions": 0, "executions": 0,
                              "cov": 0, "ft": 0, "corpus_seeds": len(list(seeds.iterdir())), "peak_rss_mb": 0}
    # libFuzzer's default is the largest seed's size: too short to nest JSON past the recursion limit
    max_len = max([8192, *(p.stat().st_size for p in seeds.iterdir())])
    started = time.monotonic()
    repeats: dict[str, int] = {}
    while result["sessions"] < MAX_SESSIONS:
        left = int(seconds - result["seconds"])
        if left < 2:
            break
        with tempfile.TemporaryDirectory(prefix=f"gefl-fuzz-{name}-") as tmp:
            report = Path(tmp) / "crash.json"
            env = {**os.environ, "GEFL_FUZZ_KNOWN": json.dumps(known), "GEFL_FUZZ_REPORT": str(report),
                   "GEFL_FUZZ_TMP": tmp, "GEFL_FUZZ_AS_MB": str(as_limit_mb),
                   "GEFL_FUZZ_ARTIFACTS": str(crashes_dir), "GEFL_NO_DOWNLOAD": "1",
                   "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
            if source is not None:
                env.update(PYTHONPATH=str(source), GEFL_FUZZ_SOURCE=str(source))
            command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--",
                       f"-max_total_time={left}", f"-rss_limit_mb={rss_limit_mb}", f"-timeout={timeout}",
                       f"-max_len={max_len}", "-print_final_stats=1", f"-artifact_prefix={crashes_dir}/", str(work),
                       str(seeds)]
            began = time.time()
            try:
                proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, errors="replace",
                                      timeout=left + 120)
                text, code = proc.stderr + proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as exc:
                text, code = (exc.stderr or "") + (exc.stdout or ""), -9
                text = text if isinstance(text, str) else text.decode("utf-8", "replace")
            ended = time.time()
            crash = json.loads(report.read_text()) if report.exists() else None
        session = parse_session(text)
        result["sessions"] += 1
        if session["ready"] is None and code != 0:
            raise SystemExit(f"{name}: the fuzzing child failed before it started (exit {code}):\n{text[-3000:]}")
        result["seconds"] += ended - (session["ready"] or began)
        result["executions"] += session["executions"]
        result["cov"], result["ft"] = max(result["cov"], session["cov"]), max(result["ft"], session["ft"])
        result["peak_rss_mb"] = max(result["peak_rss_mb"], session["peak_rss_mb"])
        if session["error"] is None and code == 0:
            break  # ran its time out
        kind = {"fuzz target exited": "exception", "timeout": "timeout", "out-of-memory": "oom"}.get(
            session["error"] or "", session["error"] or f"exit {code}")
        entry: dict[str, Any] = {"kind": kind}
        if crash is not None:
            entry.update(crash)
            entry["kind"] = "hang" if crash["exception"].startswith("Hang") else "exception"
        else:
            site = _python_site(session["traceback"], source)
            entry.update({"exception": kind, "site": site, "code": "", "signature": f"{kind}@{site}"})
        found = session["artifact"] or entry.get("artifact")  # libFuzzer's copy, else the child's
        artifact = Path(found) if found else None
        if artifact is not None and artifact.exists():
            entry["artifact"] = artifact.relative_to(ROOT).as_posix() if artifact.is_relative_to(ROOT) else str(
                artifact)
            entry["input"] = _preview(artifact)
        entry["traceback"] = session["traceback"][-4000:]
        signature = entry["signature"]
        repeats[signature] = repeats.get(signature, 0) + 1
        if signature not in known:
            known.append(signature)
            crashes.append(entry)
        elif repeats[signature] >= 2:
            break  # a crash the child cannot skip (a libFuzzer timeout or OOM): restarting finds it again
    result["wall_s"] = time.monotonic() - started
    result["exec_per_s"] = result["executions"] / result["seconds"] if result["seconds"] else 0.0
    result["new_corpus_entries"] = len({p.name for p in work.iterdir()} - before)
    result["crashes"] = crashes
    return result


# ---------------------------------------------------------------------------------------- reports
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("atheris", "torch", "safetensors", "pillow", "protobuf", "paho-mqtt", "PyYAML"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| target | code | seconds | executions | exec/s | cov | ft | new corpus entries | crashes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['target']} | {r.get('source_short', '?')} | {r['seconds']:.0f} | {r['executions']:,} | "
                    f"{r['exec_per_s']:,.0f} | {r['cov']} | {r['ft']} | {r['new_corpus_entries']} | "
                    f"{len(r['crashes'])} |")
    return "\n".join(rows)


def write_results(results: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """benchmarks/results/fuzz.json and .md: these results, and those of targets not run this time
    from the files as they were (each says which code, when and for how long it was fuzzed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "fuzz.json"
    previous: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        previous = {t["target"]: t for t in json.loads(path.read_text())["targets"]}
    merged = {**previous, **{r["target"]: r for r in results}}
    ordered = [merged[n] for n in order if n in merged]
    meta = {"updated": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "versions": _versions()}
    path.write_text(json.dumps({**meta, "targets": ordered}, indent=2) + "\n")
    sources = sorted({f"`{r.get('source_short', '?')}`: {r.get('source', '?')}" for r in ordered})
    lines = [f"# Fuzzing the decoders (updated {meta['updated']})", "",
             f"atheris {meta['versions'].get('atheris', '?')}, Python {meta['versions']['python']}, on "
             f"{meta['cpu_count']} shared cores (one fuzzing process at a time, one thread), "
             f"`python benchmarks/fuzz.py --seconds N`. `cov` counts libFuzzer's covered edges and `ft` its "
             "features, in the gefl modules (and PIL for image_folder, PyYAML for client_config); "
             "safetensors, protobuf and json decode in native code, which libFuzzer does not see. "
             "Code: " + "; ".join(sources) + ".", "", table(ordered), ""]
    found = [(r["target"], c) for r in ordered for c in r["crashes"]]
    lines += ["## Crashes", ""] if found else ["No crashes.", ""]
    for target, c in found:
        lines.append(f"- **{target}** ({c['kind']}): `{c['exception']}` at `{c['site']}`"
                     + (f": `{c['code']}`" if c.get("code") else ""))
        if c.get("artifact"):
            lines.append(f"  input `{c['artifact']}` ({c.get('input', '')[:160]})")
    (RESULTS / "fuzz.md").write_text("\n".join(lines) + "\n")
    return ordered


def replay_file(path: Path, name: str | None) -> int:
    """Run one saved input through its target (the target is the crashes/ or corpus/ folder it is in)."""
    import traceback

    name = name or path.parent.name
    targets = load_targets()
    targets.prepare(name)
    try:
        targets.replay(name, path.read_bytes())
    except BaseException as exc:  # noqa: BLE001 - the point is to show whatever escapes
        traceback.print_exc()
        print(f"\n{name}: CRASH {targets.crash_site(exc)}")
        return 1
    print(f"{name}: {targets.LAST_OUTCOME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])  # --child NAME -- libFuzzer args
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", help="comma-separated target names (default: all)")
    parser.add_argument("--seconds", type=int, default=300, help="fuzzing time per target (default 300)")
    parser.add_argument("--make-corpus", action="store_true", help="rewrite the seed corpus and stop")
    parser.add_argument("--replay", type=Path, metavar="FILE", help="run one saved input and stop")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--as-limit-mb", type=int, default=8192,
                        help="address-space limit of a fuzzing process (0: none)")
    parser.add_argument("--timeout", type=int, default=10, help="libFuzzer's -timeout per input, seconds")
    parser.add_argument("--commit", metavar="REV",
                        help="fuzz the package as this commit has it (default: the checkout, edits included)")
    args = parser.parse_args(argv)
    if args.replay and args.commit:  # again, in a process that imports the commit's code
        with tempfile.TemporaryDirectory(prefix="gefl-fuzz-source-") as tmp:
            snapshot(args.commit, Path(tmp))
            command = [sys.executable, str(Path(__file__).resolve()), "--replay", str(args.replay)]
            command += ["--targets", args.targets] if args.targets else []
            env = {**os.environ, "PYTHONPATH": tmp, "GEFL_FUZZ_SOURCE": tmp}
            return subprocess.run(command, env=env, cwd=ROOT).returncode
    if args.replay:
        return replay_file(args.replay, args.targets)
    # the registry's names, read without importing the targets (which import torch)
    all_names = re.findall(r'^    "(\w+)": fuzz_\w+,$', (FUZZ / "targets.py").read_text(), re.M)
    names = args.targets.split(",") if args.targets else all_names
    unknown = sorted(set(names) - set(all_names))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; the targets are {', '.join(all_names)}")
    if args.make_corpus:
        targets = load_targets()
        for name, size in make_corpus(targets, names).items():
            print(f"{name:20s} {len(list((CORPUS / name).iterdir())):3d} files {size:9,} bytes")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="gefl-fuzz-source-") as tmp:
        source, code, short = None, "the checkout's working tree, uncommitted edits included", "working tree"
        if args.commit:
            source = Path(tmp)
            commit = snapshot(args.commit, source)
            code, short = f"commit {commit}", commit[:7]
        print(f"fuzzing {code}", flush=True)
        for name in names:
            print(f"fuzzing {name} for {args.seconds} s ...", flush=True)
            result = fuzz_target(name, args.seconds, args.rss_limit_mb, args.as_limit_mb, args.timeout, source)
            result.update(source=code, source_short=short, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                          seconds_asked=args.seconds)
            for c in result["crashes"]:
                print(f"  crash ({c['kind']}): {c['exception']} at {c['site']} {c.get('code', '')}", flush=True)
            results.append(result)
    print(table(results))
    write_results(results, all_names)
    print(f"wrote {RESULTS / 'fuzz.json'} and {RESULTS / 'fuzz.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
