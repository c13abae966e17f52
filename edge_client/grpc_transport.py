"""The client side of the gRPC transport: protocol messages in, protobuf calls out.

Torch-free (grpc, numpy and the stubs only), so the transport benchmark can run a hundred echo
clients as threads. Errors come back as three kinds the runtime acts on differently:
`Unavailable` (the aggregator is away: back off and retry), `Unauthenticated` (register again)
and `Refused` (the aggregator said no, with its reason).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from gefl.edge_client.transport import Unauthenticated, Unavailable
from gefl.protos import KEEPALIVE, MAX_MESSAGE
from gefl.protos import gefl_v1_pb2 as pb
from gefl.protos import gefl_v1_pb2_grpc as pb_grpc

from gefl.errors import GeflError
from gefl.files import read_file
from gefl.protocol import (
    ArtifactRef,
    Refused,
    RegisterRequest,
    Registration,
    TaskInfo,
    UploadHeader,
)
from gefl.protocol.wire import chunks, sha256

CALL_TIMEOUT_S = 30.0
SERVER_BUSY = "Concurrent RPC limit exceeded!"
"""What grpcio's server answers, with RESOURCE_EXHAUSTED, when maximum_concurrent_rpcs are open."""
TRANSFER_TIMEOUT_S = 600.0
_STATUS = {pb.Task.WAIT: "wait", pb.Task.TRAIN: "train", pb.Task.FINISHED: "finished"}


def _translate(exc: grpc.RpcError, what: str) -> GeflError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or (
            # The server's concurrency limit, not the aggregator's verdict (a full federation, an upload
            # too large): the server is busy, so back off and try again like any unavailable server.
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == SERVER_BUSY):
        return Unavailable(f"{what}: aggregator unavailable ({code.name if code else 'no status'}: {details})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated("UNAUTHENTICATED", f"{what}: {details}")
    return Refused(code.name if code else "UNKNOWN", f"{what}: {details}")


def _read(path: str | Path | None, what: str) -> bytes | None:
    return None if path is None else read_file(path, what)


class GrpcClientTransport:
    def __init__(self, address: str, enrol_token: str, *, ca: str | Path | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 channel_options: list[tuple[str, int | str]] | None = None) -> None:
        """`ca` switches TLS on (the CA that signed the aggregator's certificate); `cert` and `key`
        are this client's own certificate, for an aggregator that asks for mutual TLS."""
        if (cert is None) != (key is None):
            raise GeflError("--cert and --key go together (the client certificate and its private key)")
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                   *KEEPALIVE, *(channel_options or [])]
        if ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca, "CA certificate"), private_key=_read(key, "client key"),
                certificate_chain=_read(cert, "client certificate"))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        self.address = address
        self.enrol_token = enrol_token
        self.token = ""

    def _meta(self, token: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token if token is not None else self.token}")]

    def register(self, request: RegisterRequest) -> Registration:
        profile = request.profile
        message = pb.RegisterRequest(
            protocol_version=request.protocol_version, name=request.name, tier=request.tier,
            num_samples=request.num_samples, label_histogram=list(request.label_histogram),
            credential=request.credential)
        if profile:
            message.profile.CopyFrom(pb.DeviceProfile(
                arch=profile.get("arch") or "", cpu_count=profile.get("cpu_count") or 0,
                memory_total_bytes=profile.get("memory_total_bytes") or 0,
                memory_available_bytes=profile.get("memory_available_bytes") or 0,
                board=profile.get("board") or "", board_family=profile.get("board_family") or "",
                cuda=bool(profile.get("cuda")), train_samples_per_s=profile.get("train_samples_per_s") or 0.0))
        try:
            reply = self.stub.Register(message, metadata=self._meta(self.enrol_token), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _translate(exc, "register") from exc
        self.token = reply.token
        return Registration(reply.client_id, reply.token, reply.tier, reply.tier_reason, reply.config_yaml,
                            reply.federation, reply.heartbeat_interval_s)

    def fetch_task(self, wait_s: float) -> TaskInfo:
        try:
            t = self.stub.FetchTask(pb.FetchTaskRequest(wait_s=wait_s), metadata=self._meta(),
                                    timeout=wait_s + CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _translate(exc, "fetch task") from exc
        return TaskInfo(_STATUS.get(t.status, "wait"), t.round, t.phase, t.tier, t.seed,
                        tuple(ArtifactRef(a.name, a.size, a.sha256) for a in t.artifacts), t.upload_name,
                        t.max_upload_bytes, t.deadline_s)

    def download(self, round_number: int, ref: ArtifactRef) -> bytearray:
        """The artifact's bytes, checked against the size and sha256 its task announced."""
        data = bytearray(ref.size)  # filled in place: one copy of the payload, however large
        received = 0
        try:
            for chunk in self.stub.Download(pb.DownloadRequest(round=round_number, name=ref.name),
                                            metadata=self._meta(), timeout=TRANSFER_TIMEOUT_S):
                end = received + len(chunk.data)
                if end > ref.size:
                    raise Refused("DATA_LOSS", f"download {ref.name}: more than the announced {ref.size:,} bytes")
                data[received:end] = chunk.data
                received = end
        except grpc.RpcError as exc:
            raise _translate(exc, f"download {ref.name}") from exc
        if received != ref.size or sha256(data) != ref.sha256:
            raise Refused("DATA_LOSS", f"download {ref.name}: {received:,} bytes whose sha256 does not match the "
                          "task's; corrupted in transit")
        return data

    def upload(self, header: UploadHeader, payload: bytes) -> str:
        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=pb.UploadHeader(
                round=header.round, phase=header.phase, name=header.name, size=header.size, sha256=header.sha256,
                num_samples=header.num_samples, loss=header.loss))
            for index, piece in enumerate(chunks(payload)):
                yield pb.UploadMessage(chunk=pb.Chunk(index=index, data=bytes(piece)))

        try:
            return self.stub.Upload(messages(), metadata=self._meta(), timeout=TRANSFER_TIMEOUT_S).message
        except grpc.RpcError as exc:
            raise _translate(exc, f"upload {header.name} for round {header.round}") from exc

    def heartbeats(self, interval_s: float, stop: threading.Event,
                   on_reply: Callable[[int, bool], None] | None = None) -> None:
        """Hold the heartbeat stream open until `stop` is set or the run finishes; raises on a broken stream."""

        def beats() -> Iterator[pb.HeartbeatRequest]:
            while not stop.is_set():
                yield pb.HeartbeatRequest()
                stop.wait(interval_s)

        call = self.stub.Heartbeat(beats(), metadata=self._meta())
        try:
            for reply in call:
                if on_reply is not None:
                    on_reply(reply.open_round, reply.finished)
                if reply.finished:
                    return
        except grpc.RpcError as exc:
            if stop.is_set():
                return
            raise _translate(exc, "heartbeat") from exc
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()
