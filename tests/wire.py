"""A raw gRPC client for tests: builds pushes by hand, including malformed ones."""
from __future__ import annotations

import numpy as np
import torch

from wanps.rpc.auth import ClientSecurity, sync_channel
from wanps.proto import codec
from wanps.proto.codec import fingerprint_of
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc

FINGERPRINT = fingerprint_of([("w", (16,), "torch.float32")])


class RawClient:
    """Joins any number of members on one channel and remembers each one's member secret
    (`secrets`), which its helpers send with every call naming that member."""

    def __init__(self, address: str, security: ClientSecurity | None = None) -> None:
        self.channel = sync_channel(address, security)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.secrets: dict[int, bytes] = {}

    def close(self) -> None:
        self.channel.close()

    def join(self, num_params: int = 16, fingerprint: bytes = FINGERPRINT, observer: bool = False,
             name: str = "") -> pb.JoinReply:
        role = pb.ROLE_OBSERVER if observer else pb.ROLE_WORKER
        reply = self.stub.Join(pb.JoinRequest(role=role, num_params=num_params, model_fingerprint=fingerprint,
                                              name=name), timeout=10)
        self.secrets[reply.worker_id] = reply.member_secret
        return reply

    def secret(self, worker_id: int) -> bytes:
        """The member secret of a member this client joined; b"" for any other id."""
        return self.secrets.get(worker_id, b"")

    def seed(self, worker_id: int, values: torch.Tensor) -> pb.SeedModelReply:
        raw = values.numpy().tobytes()
        chunks = [pb.ModelChunk(worker_id=worker_id, num_params=values.numel(), offset=o, values=v,
                                member_secret=self.secret(worker_id))
                  for o, v in codec.iter_model_chunks(raw)]
        return self.stub.SeedModel(iter(chunks), timeout=10)

    def pull(self, worker_id: int) -> tuple[int, torch.Tensor]:
        request = pb.PullModelRequest(worker_id=worker_id, member_secret=self.secret(worker_id))
        chunks = list(self.stub.PullModel(request, timeout=10))
        raw = b"".join(c.values for c in chunks)
        return chunks[0].version, torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())

    def push_raw(self, header: pb.PushHeader, chunks: list[pb.SparseChunk]) -> pb.PushReply:
        messages = [pb.PushMessage(header=header), *(pb.PushMessage(chunk=c) for c in chunks)]
        return self.stub.Push(iter(messages), timeout=10)

    def push(self, worker_id: int, round_: int, indices: list[int], values: list[float],
             computed_at: int | None = None) -> pb.PushReply:
        header = pb.PushHeader(worker_id=worker_id, round=round_,
                               computed_at_version=round_ if computed_at is None else computed_at,
                               codec=pb.CODEC_SPARSE, value_dtype=pb.VALUE_DTYPE_FLOAT32, count=len(indices),
                               member_secret=self.secret(worker_id))
        chunk = pb.SparseChunk(indices=np.asarray(indices, dtype="<u4").tobytes(),
                               values=np.asarray(values, dtype="<f4").tobytes())
        return self.push_raw(header, [chunk])

    def skip(self, worker_id: int, round_: int) -> pb.PushReply:
        return self.push_raw(pb.PushHeader(worker_id=worker_id, round=round_, computed_at_version=round_, skip=True,
                                           member_secret=self.secret(worker_id)), [])

    def updates(self, worker_id: int, from_version: int, timeout: float = 10):
        return self.stub.Updates(pb.UpdatesRequest(worker_id=worker_id, from_version=from_version,
                                                   member_secret=self.secret(worker_id)), timeout=timeout)

    def ping(self, worker_id: int, **fields) -> pb.PingReply:
        return self.stub.Ping(pb.PingRequest(worker_id=worker_id, member_secret=self.secret(worker_id), **fields),
                              timeout=10)

    def leave(self, worker_id: int) -> pb.LeaveReply:
        return self.stub.Leave(pb.LeaveRequest(worker_id=worker_id, member_secret=self.secret(worker_id)),
                               timeout=10)

    def resume(self, worker_id: int) -> pb.ResumeReply:
        return self.stub.Resume(pb.ResumeRequest(worker_id=worker_id, member_secret=self.secret(worker_id)),
                                timeout=10)


def models_by_version(observer) -> dict[int, torch.Tensor]:
    """Replay an observer's recorded deltas on its initial model: the model at every version."""
    replay = observer.initial_values.clone()
    models = {observer.initial_version: replay.clone()}
    for item in observer.replica.applied:
        codec.apply_delta(replay, item.delta)
        models[item.version] = replay.clone()
    return models
