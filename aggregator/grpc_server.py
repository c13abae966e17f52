"""The aggregator's gRPC face: protos/gefl_v1.proto's Aggregator service over a Coordinator.

Each handler authenticates the caller from its metadata, calls the coordinator and translates:
protocol messages to protobuf and back, `Refused` to a gRPC status with the coordinator's
message. Uploads are refused on their header, before their bytes are read, whenever possible.
The standard gRPC health service runs beside it (SERVING while rounds are served).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from gefl.aggregator.coordinator import Client, Coordinator
from gefl.protos import KEEPALIVE, MAX_MESSAGE
from gefl.protos import gefl_v1_pb2 as pb
from gefl.protos import gefl_v1_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gefl.errors import GeflError
from gefl.files import read_file
from gefl.protocol import Refused, RegisterRequest, UploadHeader
from gefl.protocol.wire import chunks

SERVICE = "gefl.v1.Aggregator"

_STATUS = {
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
}
_TASK_STATUS = {"wait": pb.Task.WAIT, "train": pb.Task.TRAIN, "finished": pb.Task.FINISHED}


def bearer_token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return ""


def certificate_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client's certificate, when mutual TLS verified one; else None."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


def _abort(context: grpc.ServicerContext, exc: Refused) -> None:
    context.abort(_STATUS.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT), str(exc))


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def _client(self, context: grpc.ServicerContext) -> Client:
        try:
            return self.coordinator.authenticate(bearer_token(context))
        except Refused as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        profile = request.profile
        try:
            reg = self.coordinator.register(bearer_token(context), transport="gRPC",
                                            peer_name=certificate_name(context), request=RegisterRequest(
                name=request.name, tier=request.tier or "auto",
                profile={"arch": profile.arch, "cpu_count": profile.cpu_count,
                         "memory_total_bytes": profile.memory_total_bytes,
                         "memory_available_bytes": profile.memory_available_bytes, "board": profile.board,
                         "board_family": profile.board_family, "cuda": profile.cuda,
                         "train_samples_per_s": profile.train_samples_per_s or None} if request.HasField("profile")
                else {},
                num_samples=request.num_samples, label_histogram=tuple(request.label_histogram),
                protocol_version=request.protocol_version, credential=request.credential))
        except Refused as exc:
            _abort(context, exc)
        return pb.RegisterReply(client_id=reg.client_id, token=reg.token, tier=reg.tier, tier_reason=reg.tier_reason,
                                config_yaml=reg.config_yaml, federation=reg.federation,
                                heartbeat_interval_s=reg.heartbeat_interval_s)

    def FetchTask(self, request: pb.FetchTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        client = self._client(context)
        task = self.coordinator.next_task(client, request.wait_s, context.is_active)
        return pb.Task(status=_TASK_STATUS[task.status], round=task.round, phase=task.phase, tier=task.tier,
                       seed=task.seed, upload_name=task.upload_name, max_upload_bytes=task.max_upload_bytes,
                       deadline_s=task.deadline_s,
                       artifacts=[pb.ArtifactRef(name=a.name, size=a.size, sha256=a.sha256) for a in task.artifacts])

    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        client = self._client(context)
        try:
            data = self.coordinator.artifact(client, request.round, request.name)
        except Refused as exc:
            _abort(context, exc)
        for index, piece in enumerate(chunks(data)):
            self.coordinator.touch(client)
            yield pb.Chunk(index=index, data=bytes(piece))

    def Upload(self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext) -> pb.UploadReply:
        client = self._client(context)
        header = UploadHeader(0, "", "", 0, "", 0, 0.0)
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("item") != "header":
                raise Refused("INVALID_ARGUMENT", "an upload starts with its header")
            h = first.header
            header = UploadHeader(h.round, h.phase, h.name, h.size, h.sha256, h.num_samples, h.loss)
            limit = self.coordinator.check_header(client, header)
            payload = self._receive(request_iterator, header, limit, lambda: self.coordinator.touch(client))
        except Refused as exc:
            if not exc.logged:
                self.coordinator.log_refusal(client, header.round, exc)
            _abort(context, exc)
        try:
            self.coordinator.submit(client, header, payload)
        except Refused as exc:
            _abort(context, exc)
        return pb.UploadReply(message=f"round {header.round}: {header.name} accepted")

    @staticmethod
    def _receive(request_iterator: Iterator[pb.UploadMessage], header: UploadHeader, limit: int,
                 alive: Callable[[], None]) -> bytearray:
        """The upload's bytes, written into one buffer of the announced size (already checked against
        the limit), so an upload costs its size in memory once, not once per copy."""
        payload = bytearray(header.size)
        received = 0
        for expected_index, message in enumerate(request_iterator):
            if message.WhichOneof("item") != "chunk" or message.chunk.index != expected_index:
                raise Refused("INVALID_ARGUMENT", f"upload chunk {expected_index} is missing or out of order")
            end = received + len(message.chunk.data)
            if end > header.size:
                raise Refused("RESOURCE_EXHAUSTED", f"the upload goes past its announced {header.size:,} bytes "
                              f"(limit {limit:,})")
            payload[received:end] = message.chunk.data
            received = end
            alive()
        return payload if received == header.size else payload[:received]

    def Heartbeat(self, request_iterator: Iterator[pb.HeartbeatRequest],
                  context: grpc.ServicerContext) -> Iterator[pb.HeartbeatReply]:
        client = self._client(context)
        # Marked offline (silent too long), the client's stream is cancelled so this thread is freed
        # at once, not when TCP eventually notices that a frozen or vanished device is gone.
        unwatch = self.coordinator.on_offline(client, context.cancel)
        try:
            for _ in request_iterator:
                open_round, finished = self.coordinator.heartbeat(client)
                yield pb.HeartbeatReply(open_round=open_round, finished=finished)
                if finished:
                    return
        except grpc.RpcError:
            pass
        finally:
            unwatch()
            if not context.is_active() or not self.coordinator.finished:
                self.coordinator.disconnected(client, "its heartbeat stream closed")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """When given, clients must present a certificate signed by it (mutual TLS)."""


MAX_HEALTH_WATCHES = 16
"""Open Health.Watch streams at once. They need no token, and gRPC counts every open stream against
one concurrency limit: unbounded, a burst of them would crowd out the federation's own calls."""


class BoundedHealthServicer(health.HealthServicer):
    """The standard health service, with its unauthenticated Watch streams bounded apart from the
    federation's calls (the server's limit is raised by the same amount)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches = threading.BoundedSemaphore(MAX_HEALTH_WATCHES)

    def Watch(self, request, context, send_response_callback=None):  # noqa: N802 - gRPC's method name
        if not self._watches.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_HEALTH_WATCHES} health watches at "
                          "once; use Health.Check, or try again later")
        context.add_callback(self._watches.release)
        return super().Watch(request, context, send_response_callback)


def start_server(coordinator: Coordinator, listen: str, tls: TlsFiles | None = None,
                 max_workers: int | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Serve the coordinator on `listen` (HOST:PORT; port 0 picks a free one); returns the server and its port.

    Every client holds a heartbeat stream and, between rounds, a long poll, each a server thread:
    the pool is sized for that so a hundred clients never queue behind each other.
    """
    workers = max_workers or 3 * coordinator.settings.num_clients + 16
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gefl-grpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.so_reuseport", 0), *KEEPALIVE, ("grpc.http2.min_ping_interval_without_data_ms", 5_000)],
        maximum_concurrent_rpcs=workers + MAX_HEALTH_WATCHES,
    )
    pb_grpc.add_AggregatorServicer_to_server(AggregatorService(coordinator), server)
    health_servicer = BoundedHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        credentials = grpc.ssl_server_credentials(
            [(read_file(tls.key, "TLS key"), read_file(tls.cert, "TLS certificate"))],
            root_certificates=read_file(tls.client_ca, "client CA certificate") if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None)
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise GeflError(f"cannot listen on {listen}: the address is taken or not valid (HOST:PORT, port 0 for any)")
    server.start()
    for service in ("", SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
