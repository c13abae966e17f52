"""The device probe against fake board trees (real files under tmp_path) and the real machine."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from gefl.edge_client.probe import ProbeReport, format_profile, probe

from gefl.errors import GeflError

SCHEMA = Path(__file__).resolve().parents[1] / "configs" / "schemas" / "probe.schema.json"

KEYS = {
    "arch", "cpu_count", "memory_total_bytes", "memory_available_bytes", "board", "board_family", "cuda",
    "train_samples_per_s",
}


def meminfo(total_kb: int, available_kb: int) -> str:
    return (
        f"MemTotal:        {total_kb} kB\n"
        f"MemFree:         {available_kb // 2} kB\n"
        f"MemAvailable:    {available_kb} kB\n"
        "Buffers:           31416 kB\n"
        "Cached:           512000 kB\n"
        "HugePages_Total:       0\n"
        "Hugepagesize:       2048 kB\n"
    )


def cpuinfo(n: int) -> str:
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n" for i in range(n))


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


TEGRA_R36 = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Jul 19 23:24:25 UTC 2024\n"
    "# KERNEL_VARIANT: oot\n"
)


def test_raspberry_pi_4(tmp_path):
    root = tree(tmp_path, {
        "proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\x00",
        "proc/meminfo": meminfo(3884292, 3407856),
        "proc/cpuinfo": cpuinfo(4) + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
        "proc/sys/kernel/arch": "aarch64\n",
    })
    profile = probe(root, measure=False)
    assert profile.board_family == "raspberry-pi"
    assert profile.board == "Raspberry Pi 4 Model B Rev 1.4"
    assert profile.arch == "aarch64"
    assert profile.cpu_count == 4
    assert profile.memory_total_bytes == 3884292 * 1024
    assert profile.memory_available_bytes == 3407856 * 1024
    assert profile.cuda is None
    assert profile.train_samples_per_s is None
    assert set(profile.to_dict()) == KEYS


def test_jetson_orin_nano_shares_system_memory_with_its_gpu(tmp_path):
    root = tree(tmp_path, {
        "sys/firmware/devicetree/base/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00",
        "etc/nv_tegra_release": TEGRA_R36,
        "proc/meminfo": meminfo(7802336, 6120448),
        "proc/cpuinfo": cpuinfo(6),
        "proc/sys/kernel/arch": "aarch64\n",
    })
    profile = probe(root, measure=False)
    assert profile.board_family == "jetson"
    assert profile.board == "NVIDIA Jetson Orin Nano Developer Kit"
    assert profile.cpu_count == 6
    assert profile.memory_total_bytes == 7802336 * 1024
    assert profile.cuda == {
        "name": "NVIDIA Jetson Orin Nano Developer Kit (integrated)",
        "memory_total_bytes": profile.memory_total_bytes,
        "shared_memory": True,
    }
    assert probe(root, measure=False, use_cuda=False).cuda is None


def test_jetson_recognised_from_nv_tegra_release_alone(tmp_path):
    root = tree(tmp_path, {
        "etc/nv_tegra_release": TEGRA_R36,
        "proc/meminfo": meminfo(7802336, 6120448),
        "sys/devices/system/cpu/online": "0-5\n",
    })
    profile = probe(root, measure=False)
    assert profile.board_family == "jetson"
    assert profile.board == "NVIDIA Jetson (L4T R36.3.0)"
    assert profile.cpu_count == 6  # no cpuinfo: counted from the online range
    assert profile.cuda is not None and profile.cuda["shared_memory"] is True
    assert profile.cuda["memory_total_bytes"] == 7802336 * 1024


def test_tree_without_board_files_is_a_generic_machine(tmp_path):
    root = tree(tmp_path, {"proc/meminfo": meminfo(16309412, 12000000), "proc/cpuinfo": cpuinfo(8)})
    profile = probe(root, measure=False)
    assert profile.board_family == "generic"
    assert profile.board is None
    assert profile.cuda is None
    assert profile.cpu_count == 8
    assert profile.arch  # the host's platform.machine(): the tree does not say
    text = format_profile(profile)
    assert "8 cores" in text and "15.6 GiB total" in text and "11.4 GiB available" in text
    assert "not measured" in text


def test_missing_files_only_make_the_profile_vaguer(tmp_path):
    profile = probe(tmp_path, measure=False)
    assert (profile.board, profile.board_family, profile.cpu_count) == (None, "generic", 1)
    assert (profile.memory_total_bytes, profile.memory_available_bytes) == (0, 0)


def test_kernel_without_memavailable_estimates_it(tmp_path):
    root = tree(tmp_path, {"proc/meminfo": "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"})
    assert probe(root, measure=False).memory_available_bytes == 420 * 1024


@pytest.mark.parametrize("bad_line", ["MemTotal:        lots kB", "this is not meminfo"])
def test_malformed_meminfo_names_the_file_and_line(tmp_path, bad_line):
    root = tree(tmp_path, {"proc/meminfo": f"MemFree: 100 kB\n{bad_line}\n"})
    with pytest.raises(GeflError) as err:
        probe(root, measure=False)
    message = str(err.value)
    assert str(root / "proc" / "meminfo") in message
    assert "line 2" in message and bad_line.strip() in message


def test_real_machine_validates_against_the_schema():
    profile = probe("/", measure=True)
    assert isinstance(profile, ProbeReport)
    assert profile.arch
    assert profile.cpu_count >= 1
    assert 0 < profile.memory_available_bytes <= profile.memory_total_bytes
    assert profile.train_samples_per_s is not None and profile.train_samples_per_s > 0
    document = {**profile.to_dict(), "tier": "x", "reason": "y"}
    document = json.loads(json.dumps(document))  # what `gefl probe --json` prints must survive JSON
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert "samples/s" in format_profile(profile)


def test_the_running_machine_reports_pythons_architecture():
    """Python's view is the one pip's wheels follow; under qemu-user the kernel's file names the host."""
    import platform

    assert probe("/", measure=False).arch == platform.machine()


def test_the_probe_times_the_tier_the_catalogue_names(tmp_path):
    """The reference tier is the catalogue's (configs/tiers.yaml), not a second copy in the probe."""
    import yaml
    from gefl.edge_client.probe import _format_throughput, reference_tier

    from gefl.tiers.devices import CATALOGUE_PATH, load_catalogue

    assert reference_tier() == load_catalogue().reference_tier
    data = yaml.safe_load(Path(CATALOGUE_PATH).read_text())
    data["reference_tier"] = "cnn2"
    other = tmp_path / "tiers.yaml"
    other.write_text(yaml.safe_dump(data))
    assert reference_tier(load_catalogue(other)) == "cnn2"
    assert f"({reference_tier()}, batch" in _format_throughput(1000.0)


def test_the_policy_reads_a_probe_report_through_one_conversion(tmp_path):
    """The probe reports bytes and a CUDA description; the policy's DeviceProfile is MB and a build
    flag. DeviceProfile.from_probe is the one conversion (gefl probe and --tier auto both use it)."""
    from gefl.errors import GeflError
    from gefl.tiers.devices import DeviceProfile

    root = tree(tmp_path, {"proc/meminfo": meminfo(3884292, 3407856), "proc/cpuinfo": cpuinfo(4)})
    report = {**probe(root, measure=False).to_dict(), "train_samples_per_s": 850.0}
    device = DeviceProfile.from_probe(report, "pi")
    assert device.memory_available_mb == 3407856 / 1024 and device.memory_total_mb == 3884292 / 1024
    assert (device.cores, device.train_samples_per_s, device.cuda) == (4, 850.0, False)
    assert DeviceProfile.from_probe({**report, "cuda": {"name": "Orin"}}).cuda
    with pytest.raises(GeflError, match="measured profile"):
        DeviceProfile.from_probe({**report, "train_samples_per_s": None})
