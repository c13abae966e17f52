"""What the aggregator and a client say to each other, independent of the transport.

gRPC (protos/gefl_v1.proto) and MQTT carry these same messages; the aggregator's coordinator
speaks in them and each transport only translates. A refusal carries a code that each transport
maps to its own (gRPC status codes), and a message written for the person reading the log.
Numpy-only: no torch, so transports and the benchmark's echo clients stay light.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from gefl.errors import GeflError

PROTOCOL_VERSION = 1

MAX_NAME = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*\Z")


def valid_client_name(name: str) -> bool:
    """1-128 letters, digits and ._:@- (a hostname fits): safe in logs, file names and MQTT topic levels."""
    return 0 < len(name) <= MAX_NAME and bool(_NAME.match(name))

def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(host: str, what: str, insecure: bool) -> None:
    """Plaintext is for loopback: anywhere else tokens and model weights would cross the network in
    clear, so it takes the user's explicit --insecure."""
    if not insecure and not is_loopback(host):
        raise GeflError(f"{what} without TLS on {host} would send tokens and model weights across the network in "
                        "clear: set up TLS (`gefl certs` makes the certificates), use a loopback address, or pass "
                        "--insecure to accept plaintext")


WAIT, TRAIN, FINISHED = "wait", "train", "finished"
"""Task statuses: nothing for this client yet, a round to train, the run is over."""

# Refusal codes; the names are gRPC's status codes, which say the same things.
UNAUTHENTICATED = "UNAUTHENTICATED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
DATA_LOSS = "DATA_LOSS"
NOT_FOUND = "NOT_FOUND"


class Refused(GeflError):
    """The aggregator turned a request down; `code` says what kind of problem it was."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.logged = False
        """Set once the aggregator has logged it, so a transport does not log it twice."""


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Registration:
    client_id: int
    token: str
    tier: str
    tier_reason: str
    config_yaml: str
    federation: str
    heartbeat_interval_s: float


@dataclass(frozen=True)
class TaskInfo:
    status: str
    round: int = 0
    phase: str = ""
    tier: str = ""
    seed: int = 0
    artifacts: tuple[ArtifactRef, ...] = ()
    upload_name: str = ""
    max_upload_bytes: int = 0
    deadline_s: float = 0.0


@dataclass(frozen=True)
class UploadHeader:
    round: int
    phase: str
    name: str
    size: int
    sha256: str
    num_samples: int
    loss: float


@dataclass(frozen=True)
class RegisterRequest:
    name: str
    tier: str = "auto"
    profile: dict = field(default_factory=dict)
    """edge_client.probe.DeviceProfile.to_dict(), or {} when the client did not probe."""
    num_samples: int = 0
    label_histogram: tuple[int, ...] = ()
    """Empty unless the device's user opted in: a board's label distribution is private."""
    protocol_version: int = PROTOCOL_VERSION
    credential: str = ""
    """The token of this device's earlier registration: the proof that it owns its name."""
