from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceProfile(_message.Message):
    __slots__ = ("arch", "cpu_count", "memory_total_bytes", "memory_available_bytes", "board", "board_family", "cuda", "train_samples_per_s")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BOARD_FIELD_NUMBER: _ClassVar[int]
    BOARD_FAMILY_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    arch: str
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    board: str
    board_family: str
    cuda: bool
    train_samples_per_s: float
    def __init__(self, arch: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., board: _Optional[str] = ..., board_family: _Optional[str] = ..., cuda: _Optional[bool] = ..., train_samples_per_s: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "name", "tier", "profile", "num_samples", "label_histogram", "credential")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    name: str
    tier: str
    profile: DeviceProfile
    num_samples: int
    label_histogram: _containers.RepeatedScalarFieldContainer[int]
    credential: str
    def __init__(self, protocol_version: _Optional[int] = ..., name: _Optional[str] = ..., tier: _Optional[str] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., num_samples: _Optional[int] = ..., label_histogram: _Optional[_Iterable[int]] = ..., credential: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "token", "tier", "tier_reason", "config_yaml", "federation", "heartbeat_interval_s")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    token: str
    tier: str
    tier_reason: str
    config_yaml: str
    federation: str
    heartbeat_interval_s: float
    def __init__(self, client_id: _Optional[int] = ..., token: _Optional[str] = ..., tier: _Optional[str] = ..., tier_reason: _Optional[str] = ..., config_yaml: _Optional[str] = ..., federation: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class FetchTaskRequest(_message.Message):
    __slots__ = ("wait_s",)
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    def __init__(self, wait_s: _Optional[float] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("status", "round", "phase", "tier", "seed", "artifacts", "upload_name", "max_upload_bytes", "deadline_s")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Task.Status]
        WAIT: _ClassVar[Task.Status]
        TRAIN: _ClassVar[Task.Status]
        FINISHED: _ClassVar[Task.Status]
    STATUS_UNSPECIFIED: Task.Status
    WAIT: Task.Status
    TRAIN: Task.Status
    FINISHED: Task.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    status: Task.Status
    round: int
    phase: str
    tier: str
    seed: int
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactRef]
    upload_name: str
    max_upload_bytes: int
    deadline_s: float
    def __init__(self, status: _Optional[_Union[Task.Status, str]] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ..., tier: _Optional[str] = ..., seed: _Optional[int] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactRef, _Mapping]]] = ..., upload_name: _Optional[str] = ..., max_upload_bytes: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round", "name")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    round: int
    name: str
    def __init__(self, round: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round", "phase", "name", "size", "sha256", "num_samples", "loss")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    name: str
    size: int
    sha256: str
    num_samples: int
    loss: float
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., num_samples: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("open_round", "finished")
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    open_round: int
    finished: bool
    def __init__(self, open_round: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...
