"""Property-based fuzzing of every RPC of both services, on the real servicers over real sockets.

Each RPC gets random and adversarial requests (hypothesis). For every call:
- no crash: never UNKNOWN or INTERNAL;
- the status code the rules give (a small reference model of the rules below, written
  from docs/architecture.md, decides the expected code from the request and the live state);
- a refused call changes nothing: model, version, membership, open rounds (controller:
  estimates, reported round, decisions) are as before.

The default run is small (FUZZ_EXAMPLES per RPC, well under a minute in all); the `slow`
variants run SLOW_EXAMPLES per RPC. Hypothesis keeps no example database (nothing written).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

from conftest import Cluster, LoopThread
from wanps.controller.policy import POLICIES, PolicyConfig
from wanps.controller.service import MAX_ROUND, ControllerConfig
from wanps.rpc.auth import sync_channel
from wanps.proto.codec import MAX_PARAMS
from wanps.proto.wire import MAX_TAU, name_problem
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.rpc.limits import Limits
from wanps.server.service import MAX_PING_PADDING, ServerConfig

from wire import FINGERPRINT, RawClient

pytestmark = pytest.mark.timeout(300)

FUZZ_EXAMPLES = 60
SLOW_EXAMPLES = 1500
NUM_PARAMS = 16
TAU_MAX = 2
HISTORY = 4
MAX_ELEMENTS = 4096  # the element limit of the fuzzed server (the model has 16)
ADVANCED_ROUNDS = 10  # closed before fuzzing, so history and "the past" exist
STREAM_WAIT_S = 2.0
CRASHES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
OK = None
U64 = 2**64 - 1

I = grpc.StatusCode.INVALID_ARGUMENT
FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
PD = grpc.StatusCode.PERMISSION_DENIED
RE = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_files_in_a_temporary_directory(tmp_path_factory):
    """Hypothesis caches (constants, unicode data) go to a temporary directory, not the checkout."""
    previous = configuration.storage_directory()
    configuration.set_hypothesis_home_dir(str(tmp_path_factory.mktemp("hypothesis")))
    yield
    configuration.set_hypothesis_home_dir(str(previous))


def budget(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------- the cluster under fuzz


@dataclass
class Fuzzed:
    cluster: Cluster
    client: RawClient
    controller: pb_grpc.ControllerStub
    raw_server: grpc.Channel
    workers: tuple[int, int]
    observer: int

    @property
    def core(self):
        return self.cluster.core

    def is_known(self, worker_id: int) -> bool:
        return worker_id in self.core.members or worker_id in self.core.observers

    def identity_code(self, worker_id: int, secret: bytes) -> grpc.StatusCode | None:
        """The rule for any call naming a member: NOT_FOUND for an id nobody holds,
        PERMISSION_DENIED without that member's secret (docs/security.md)."""
        if not self.is_known(worker_id):
            return NF
        # A member some fuzzed Join added holds a random secret nothing here knows or guesses.
        known_secret = self.client.secrets.get(worker_id)
        return OK if known_secret is not None and secret == known_secret else PD

    def server_state(self):
        core = self.core
        members = {w: (m.first_round, m.last_round, m.highest_round_sent) for w, m in core.members.items()}
        rounds = {r: (sorted(o.updates), sorted(o.skips)) for r, o in core.open_rounds.items()}
        model = None if core.model is None else core.model.clone()
        return (model, core.version, members, sorted(core.observers), rounds, core.num_params, core.fingerprint,
                core.started)

    def controller_state(self):
        core = self.cluster.controller.service.core
        return (core.policy, core.reported_round, sorted(core.estimators), dict(core.estimates),
                [(d.decision_id, d.from_round, d.tau, d.delta) for d in core.book.relevant(0)], core.num_params)


def states_equal(a, b) -> bool:
    model_a, *rest_a = a
    model_b, *rest_b = b
    same_model = (model_a is None and model_b is None) or (
        model_a is not None and model_b is not None and torch.equal(model_a, model_b))
    return same_model and rest_a == rest_b


@contextmanager
def fuzzed_cluster(seeded: bool = True, advance: bool = True) -> Iterator[Fuzzed]:
    loop = LoopThread()
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, tau_max=TAU_MAX, min_workers=2,
                                 history_rounds=HISTORY,
                                 limits=Limits(max_payload_elements=MAX_ELEMENTS, max_streams_per_worker=10_000,
                                               join_rate_per_s=1e9, join_burst=10**9),
                                 check_core_thread=True)
    controller_config = ControllerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                                         policy=PolicyConfig(name="static", tau=1, delta=0.5), max_workers=10**6)
    cluster = Cluster(loop, server_config, controller_config)
    client = RawClient(cluster.server_address)
    controller_channel = sync_channel(cluster.controller_address)
    raw_server = sync_channel(cluster.server_address)
    try:
        a, b = client.join().worker_id, client.join().worker_id
        observer = client.join(observer=True).worker_id
        if seeded:
            client.seed(a, torch.arange(NUM_PARAMS, dtype=torch.float32))
        if seeded and advance:
            for round_ in range(ADVANCED_ROUNDS):
                client.push(a, round_, [1, 2], [0.5, 0.25])
                client.push(b, round_, [2, 3], [0.125, 1.0])
            wait_for(lambda: cluster.server.service.history.published_through == ADVANCED_ROUNDS - 1)
        yield Fuzzed(cluster, client, pb_grpc.ControllerStub(controller_channel), raw_server, (a, b), observer)
    finally:
        client.close()
        controller_channel.close()
        raw_server.close()
        cluster.stop()
        loop.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode | None, str]:
    try:
        call()
        return OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def check(fuzzed: Fuzzed, call: Callable[[], object], expected: grpc.StatusCode | None | set, what: object,
          state: Callable[[], object] | None = None) -> grpc.StatusCode | None:
    """One fuzzed call: no crash, the expected code, nothing changed when refused."""
    state = state or fuzzed.server_state
    before = state()
    code, details = outcome(call)
    assert code not in CRASHES, f"crash {code}: {details} for {what}"
    allowed = expected if isinstance(expected, set) else {expected}
    assert code in allowed, f"expected {allowed}, got {code} ({details}) for {what}"
    if code is not OK:
        assert details, f"{code} without a message for {what}"
        after = state()
        assert states_equal(before, after) if state == fuzzed.server_state else before == after, \
            f"state changed by a refused call ({code}: {details}) for {what}"
    return code


# ---------------------------------------------------------------------------- Push


def f32_bytes(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def secrets_for(draw, fuzzed: Fuzzed, worker: int) -> bytes:
    """Mostly the member's own secret; sometimes none, a wrong one, or another member's."""
    right = fuzzed.client.secret(worker)
    others = [fuzzed.client.secret(w) for w in (*fuzzed.workers, fuzzed.observer) if w != worker]
    return draw(st.one_of(st.just(right), st.just(right), st.just(right), st.just(b""), st.binary(max_size=20),
                          st.sampled_from(others)))


@st.composite
def push_messages(draw, fuzzed: Fuzzed) -> list[pb.PushMessage]:
    version = fuzzed.core.version
    a, b = fuzzed.workers
    worker = draw(st.one_of(st.sampled_from([a, a, b]), st.just(fuzzed.observer), st.integers(0, U64)))
    secret = secrets_for(draw, fuzzed, worker)
    round_ = draw(st.one_of(st.integers(version - 3, version + TAU_MAX + 2).filter(lambda r: r >= 0),
                            st.integers(0, U64)))
    computed_at = draw(st.one_of(st.just(round_), st.just(version), st.integers(0, U64),
                                 st.integers(max(0, version - 4), version + 1)))
    codec = draw(st.one_of(st.sampled_from([pb.CODEC_SPARSE] * 3 + [pb.CODEC_DENSE, pb.CODEC_RANDOM_BLOCK]),
                           st.integers(0, 2**31 - 1)))
    dtype = draw(st.one_of(st.sampled_from([pb.VALUE_DTYPE_FLOAT32] * 3 + [pb.VALUE_DTYPE_FLOAT16,
                                                                          pb.VALUE_DTYPE_BFLOAT16]),
                           st.integers(0, 2**31 - 1)))
    k = draw(st.integers(0, NUM_PARAMS + 2))
    indices = draw(st.one_of(
        st.lists(st.integers(0, NUM_PARAMS - 1), min_size=min(k, NUM_PARAMS), max_size=min(k, NUM_PARAMS),
                 unique=True).map(sorted),
        st.lists(st.integers(0, 2**32 - 1), min_size=k, max_size=k),  # out of range, unsorted, duplicated
        st.lists(st.integers(0, NUM_PARAMS + 1), min_size=k, max_size=k)))
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    values = draw(st.one_of(st.lists(st.floats(-1e3, 1e3, width=32), min_size=k, max_size=k),
                            st.lists(floats, min_size=k, max_size=k)))
    index_raw = b"" if codec != pb.CODEC_SPARSE and draw(st.booleans()) else np.asarray(indices, "<u4").tobytes()
    if dtype == pb.VALUE_DTYPE_FLOAT32 or draw(st.booleans()):
        value_raw = f32_bytes(values)
    else:
        value_raw = np.asarray(values, dtype="<f2").tobytes()
    index_raw = draw(st.one_of(st.just(index_raw), st.binary(max_size=80),
                               st.integers(0, max(0, len(index_raw))).map(lambda n: index_raw[:n])))
    value_raw = draw(st.one_of(st.just(value_raw), st.binary(max_size=80),
                               st.integers(0, max(0, len(value_raw))).map(lambda n: value_raw[:n])))
    count = draw(st.one_of(st.just(k), st.just(NUM_PARAMS), st.integers(0, MAX_ELEMENTS + 1), st.integers(0, U64)))
    block_start = draw(st.one_of(st.just(0), st.integers(0, NUM_PARAMS + 1), st.integers(0, U64)))
    skip = draw(st.booleans()) and draw(st.booleans())
    header = pb.PushHeader(worker_id=worker, round=round_, computed_at_version=computed_at, skip=skip, codec=codec,
                           value_dtype=dtype, count=count, block_start=block_start, member_secret=secret)
    split = draw(st.integers(0, 3))  # the payload in 1-3 chunks, or none
    chunks = [pb.PushMessage(chunk=pb.SparseChunk(indices=part_i, values=part_v))
              for part_i, part_v in split_payload(index_raw, value_raw, split)]
    if skip and draw(st.booleans()):
        chunks = []
    messages = [pb.PushMessage(header=header), *chunks]
    shape = draw(st.sampled_from(["normal"] * 6 + ["no header", "two headers", "chunk first", "empty message"]))
    if shape == "no header":
        messages = messages[1:]
    elif shape == "two headers":
        messages.insert(1, pb.PushMessage(header=header))
    elif shape == "chunk first":
        messages = [pb.PushMessage(chunk=pb.SparseChunk()), *messages]
    elif shape == "empty message":
        messages.insert(draw(st.integers(0, len(messages))), pb.PushMessage())
    return messages


def split_payload(index_raw: bytes, value_raw: bytes, parts: int) -> list[tuple[bytes, bytes]]:
    if parts == 0:
        return []
    cut_i = [len(index_raw) * i // parts for i in range(parts + 1)]
    cut_v = [len(value_raw) * i // parts for i in range(parts + 1)]
    return [(index_raw[cut_i[i]:cut_i[i + 1]], value_raw[cut_v[i]:cut_v[i + 1]]) for i in range(parts)]


def payload_is_valid(h: pb.PushHeader, index_raw: bytes, value_raw: bytes) -> bool:
    """The wire rules of docs/architecture.md, stated directly (not the codec's code)."""
    if h.value_dtype not in (pb.VALUE_DTYPE_FLOAT32, pb.VALUE_DTYPE_FLOAT16, pb.VALUE_DTYPE_BFLOAT16):
        return False
    width = 4 if h.value_dtype == pb.VALUE_DTYPE_FLOAT32 else 2
    if len(value_raw) != width * h.count:
        return False
    if h.value_dtype == pb.VALUE_DTYPE_FLOAT32:
        values = np.frombuffer(value_raw, "<f4").astype(np.float64)
    elif h.value_dtype == pb.VALUE_DTYPE_FLOAT16:
        values = np.frombuffer(value_raw, "<f2").astype(np.float64)
    else:  # bfloat16: the high half of a float32
        values = (np.frombuffer(value_raw, "<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
    if not np.isfinite(values).all():
        return False
    if h.codec == pb.CODEC_RANDOM_BLOCK:
        return not index_raw and h.block_start + h.count <= NUM_PARAMS
    if h.block_start:
        return False
    if h.codec == pb.CODEC_DENSE:
        return h.count == NUM_PARAMS and not index_raw
    if h.codec != pb.CODEC_SPARSE or h.count > NUM_PARAMS or len(index_raw) != 4 * h.count:
        return False
    indices = np.frombuffer(index_raw, "<u4").astype(np.int64)
    return bool((indices < NUM_PARAMS).all() and (np.diff(indices) > 0).all())


def expected_push(fuzzed: Fuzzed, messages: list[pb.PushMessage]) -> grpc.StatusCode | None:
    """The status a push gets, in the order the server applies its rules."""
    header, received, index_raw, value_raw = None, 0, b"", b""
    for message in messages:
        part = message.WhichOneof("part")
        if part == "header":
            if header is not None:
                return I
            header = message.header
            if header.count > MAX_ELEMENTS:
                return RE
        elif part == "chunk":
            if header is None or header.skip:
                return I
            received += len(message.chunk.indices) + len(message.chunk.values)
            if received > 8 * NUM_PARAMS:
                return RE
            index_raw += message.chunk.indices
            value_raw += message.chunk.values
        else:
            return I
    if header is None:
        return I
    identity = fuzzed.identity_code(header.worker_id, header.member_secret)
    if identity is not OK:
        return identity
    core = fuzzed.core
    member = core.members.get(header.worker_id)
    if member is None:
        return NF
    if header.round < member.first_round or (member.last_round is not None and header.round > member.last_round):
        return FP
    if header.round < core.version:
        return OK  # a replay of an applied round: acknowledged as a duplicate, nothing changes
    if header.round > core.version + TAU_MAX:
        return FP
    open_round = core.open_rounds.get(header.round)
    if open_round is not None and open_round.has(header.worker_id):
        return OK  # duplicate
    if header.computed_at_version > core.version:
        return I
    if header.computed_at_version + TAU_MAX < header.round:
        return FP
    if header.skip:
        return OK
    return OK if payload_is_valid(header, index_raw, value_raw) else I


def fuzz_push(examples: int) -> None:
    with fuzzed_cluster() as fuzzed:
        @budget(examples)
        @given(st.data())
        def property_(data):
            messages = data.draw(push_messages(fuzzed))
            expected = expected_push(fuzzed, messages)
            check(fuzzed, lambda: fuzzed.client.stub.Push(iter(messages), timeout=10), expected, messages)
            assert bool(torch.isfinite(fuzzed.core.model).all())

        property_()


# ---------------------------------------------------------------------------- Join


def fuzz_join(examples: int) -> None:
    with fuzzed_cluster(advance=False) as fuzzed:
        @budget(examples)
        @given(role=st.one_of(st.sampled_from([pb.ROLE_WORKER, pb.ROLE_OBSERVER]), st.integers(0, 2**31 - 1)),
               num_params=st.one_of(st.just(NUM_PARAMS), st.integers(0, MAX_ELEMENTS + 2), st.integers(0, U64)),
               fingerprint=st.one_of(st.just(FINGERPRINT), st.binary(max_size=40)),
               name=st.one_of(st.text(max_size=30), st.text(min_size=60, max_size=70),
                              st.sampled_from(["a\nforged log line", "x" * 65, "\u202etxt.exe", "tab\there"])))
        def property_(role, num_params, fingerprint, name):
            request = pb.JoinRequest(role=role, num_params=num_params, model_fingerprint=fingerprint, name=name)
            check(fuzzed, lambda: fuzzed.client.stub.Join(request, timeout=10), expected_join(request), request)

        property_()


def expected_join(request: pb.JoinRequest) -> grpc.StatusCode | None:
    if request.role not in (pb.ROLE_WORKER, pb.ROLE_OBSERVER):
        return I
    if request.num_params > MAX_ELEMENTS:
        return RE
    if (request.shard_index, request.shard_count, request.total_params) != (0, 0, 0):
        # A shard view; this server is the single one, shard 0 of 1 (server/shard.py).
        if not 0 <= request.shard_index < request.shard_count:
            return I  # names no shard
        if (request.shard_index, request.shard_count) != (0, 1):
            return FP  # takes this server for another shard
        if request.num_params != request.total_params:
            return I  # not the length of shard 0/1's range: the whole vector
    if request.structure:
        return I  # a structure the fingerprint is not the digest of (nothing random is)
    if name_problem(request.name) is not None or request.num_params == 0 or not request.model_fingerprint:
        return I
    if request.num_params != NUM_PARAMS or request.model_fingerprint != FINGERPRINT:
        return FP
    return OK


# ---------------------------------------------------------------------------- SeedModel


def expected_seed(fuzzed: Fuzzed, chunks: list[pb.ModelChunk], seeder: int) -> grpc.StatusCode | None:
    core = fuzzed.core
    if not chunks:
        return I
    if core.seeded:
        return FP
    if chunks[0].worker_id not in core.members:
        return NF
    if chunks[0].member_secret != fuzzed.client.secret(chunks[0].worker_id):
        return PD
    filled = 0
    for chunk in chunks:
        if chunk.offset != filled // 4:
            return I
        end = filled + len(chunk.values)
        if len(chunk.values) % 4 or end > 4 * NUM_PARAMS:
            return I
        filled = end
    if filled != 4 * NUM_PARAMS:
        return I
    if chunks[0].worker_id != seeder:
        return FP
    values = np.frombuffer(b"".join(c.values for c in chunks), "<f4")
    return OK if np.isfinite(values).all() else I


def fuzz_seed(examples: int) -> None:
    with fuzzed_cluster(seeded=False) as fuzzed:
        seeder = fuzzed.workers[0]

        @budget(examples)
        @given(st.data())
        def property_(data):
            worker = data.draw(st.one_of(st.sampled_from([seeder, seeder, fuzzed.workers[1], fuzzed.observer]),
                                         st.integers(0, U64)))
            floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
            values = data.draw(st.one_of(st.lists(st.floats(-10, 10, width=32), min_size=NUM_PARAMS,
                                                  max_size=NUM_PARAMS),
                                         st.lists(floats, min_size=0, max_size=NUM_PARAMS + 2)))
            raw = data.draw(st.one_of(st.just(f32_bytes(values)), st.binary(max_size=80)))
            parts = data.draw(st.integers(0, 3))
            cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), min_size=max(0, parts - 1),
                                             max_size=max(0, parts - 1))))
            pieces = [raw[s:e] for s, e in zip([0, *cuts], [*cuts, len(raw)])] if parts else []
            offsets, filled = [], 0
            for piece in pieces:
                offsets.append(filled // 4)
                filled += len(piece)
            if data.draw(st.booleans()) and offsets:
                offsets[data.draw(st.integers(0, len(offsets) - 1))] = data.draw(st.integers(0, U64))
            secret = secrets_for(data.draw, fuzzed, worker)
            chunks = [pb.ModelChunk(worker_id=worker, offset=o, values=p, num_params=data.draw(st.integers(0, U64)),
                                    member_secret=secret)
                      for o, p in zip(offsets, pieces)]
            # One in a few examples seeds for real; later ones then meet a seeded model.
            expected = expected_seed(fuzzed, chunks, seeder)
            check(fuzzed, lambda: fuzzed.client.stub.SeedModel(iter(chunks), timeout=10), expected, chunks)

        property_()


# ---------------------------------------------------------------------------- PullModel, Updates, Ping, Leave


def fuzz_pull_and_updates(examples: int) -> None:
    with fuzzed_cluster() as fuzzed:
        known = [*fuzzed.workers, fuzzed.observer]

        @budget(examples)
        @given(worker=st.one_of(st.sampled_from(known), st.integers(0, U64)),
               from_version=st.one_of(st.integers(0, ADVANCED_ROUNDS + 3), st.integers(0, U64)),
               data=st.data())
        def property_(worker, from_version, data):
            secret = secrets_for(data.draw, fuzzed, worker)
            pull = pb.PullModelRequest(worker_id=worker, member_secret=secret)
            check(fuzzed, lambda: list(fuzzed.client.stub.PullModel(pull, timeout=10)),
                  fuzzed.identity_code(worker, secret), pull)
            request = pb.UpdatesRequest(worker_id=worker, from_version=from_version, member_secret=secret)
            expected = expected_updates(fuzzed, request)
            if expected is WAITS:
                return  # a valid stream that waits for the next round: nothing to check here

            def first_delta():
                stream = fuzzed.client.stub.Updates(request, timeout=10)
                chunk = next(stream)
                stream.cancel()
                assert chunk.round == from_version

            check(fuzzed, first_delta, expected, request)

        property_()


WAITS = "waits"  # an Updates stream that is valid and waits for the next round to close


def expected_updates(fuzzed: Fuzzed, request: pb.UpdatesRequest) -> grpc.StatusCode | None | str:
    version = fuzzed.core.version
    identity = fuzzed.identity_code(request.worker_id, request.member_secret)
    if identity is not OK:
        return identity
    if request.from_version > version:
        return FP  # ahead of the server
    if request.from_version < version - HISTORY:
        return FP  # no longer in the history: pull the model again
    if request.from_version == version:
        return WAITS
    return OK


def fuzz_ping_and_leave(examples: int) -> None:
    with fuzzed_cluster() as fuzzed:
        @budget(examples)
        @given(worker=st.one_of(st.sampled_from([*fuzzed.workers, fuzzed.observer]), st.just(0),
                                st.integers(0, U64)),
               sent=st.integers(-(2**63), 2**63 - 1),
               padding=st.one_of(st.integers(0, 64), st.integers(MAX_PING_PADDING - 1, MAX_PING_PADDING + 64)),
               reply=st.one_of(st.just(0), st.integers(0, 64), st.integers(MAX_PING_PADDING - 1, 2**32 - 1)),
               leave=st.booleans(), data=st.data())
        def property_(worker, sent, padding, reply, leave, data):
            secret = secrets_for(data.draw, fuzzed, worker)
            ping = pb.PingRequest(worker_id=worker, sent_unix_ns=sent, padding=bytes(padding), reply_bytes=reply,
                                  member_secret=secret)
            if padding > MAX_PING_PADDING:
                expected = RE
            elif reply > MAX_PING_PADDING:
                expected = I
            elif worker == 0:
                expected = OK  # an anonymous probe: no member named, nothing to prove
            else:
                expected = fuzzed.identity_code(worker, secret)  # a forgotten worker hears NOT_FOUND
            check(fuzzed, lambda: fuzzed.client.stub.Ping(ping, timeout=10), expected, (worker, sent, padding, reply))
            if leave:
                request = pb.LeaveRequest(worker_id=worker, member_secret=secret)
                check(fuzzed, lambda: fuzzed.client.stub.Leave(request, timeout=10),
                      fuzzed.identity_code(worker, secret), request)

        property_()


# ---------------------------------------------------------------------------- truncated and corrupt bytes


SERVER_METHODS = {  # method: (a valid request, request-streaming?, response-streaming?)
    "Join": (pb.JoinRequest(role=pb.ROLE_OBSERVER, num_params=NUM_PARAMS, model_fingerprint=FINGERPRINT, name="x"),
             False, False),
    "SeedModel": (pb.ModelChunk(worker_id=1, num_params=NUM_PARAMS, values=bytes(64)), True, False),
    "PullModel": (pb.PullModelRequest(worker_id=1), False, True),
    "Push": (pb.PushMessage(header=pb.PushHeader(worker_id=1, round=10, computed_at_version=10, count=1,
                                                 codec=pb.CODEC_SPARSE, value_dtype=pb.VALUE_DTYPE_FLOAT32)),
             True, False),
    "Updates": (pb.UpdatesRequest(worker_id=1, from_version=ADVANCED_ROUNDS - 1), False, True),
    "Ping": (pb.PingRequest(worker_id=1, sent_unix_ns=123, padding=b"abc"), False, False),
    "Leave": (pb.LeaveRequest(worker_id=99), False, False),
}
CONTROLLER_METHODS = {
    "Report": (pb.ReportRequest(worker_id=1, round=3, samples=[pb.LinkSample(kind=1, bytes=10, seconds=0.1)]),
               False, False),
    "SetPolicy": (pb.SetPolicyRequest(policy="static", tau=1, delta=0.5), False, False),
    "GetState": (pb.GetStateRequest(), False, False),
    "Decisions": (pb.DecisionsRequest(worker_id=1), False, True),
}


@st.composite
def corrupted(draw, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "garbage", "append"]))
    if kind == "truncate":
        return valid[:draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "flip" and valid:
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1:]
    if kind == "append":
        return valid + draw(st.binary(min_size=1, max_size=12))
    return draw(st.binary(max_size=64))


def expected_parsed(fuzzed: Fuzzed, method: str, messages: list) -> grpc.StatusCode | None | str:
    """The status the reference rules give corrupted bytes that still parse: whatever request
    they decode to is judged like any other, so OK only for one that is actually valid."""
    request = messages[0]
    name = method.rsplit("/", 1)[1]
    if name == "Join":
        return expected_join(request)
    if name == "SeedModel":
        return expected_seed(fuzzed, messages, fuzzed.workers[0])
    if name in ("PullModel", "Leave"):
        return fuzzed.identity_code(request.worker_id, request.member_secret)
    if name == "Push":
        return expected_push(fuzzed, messages)
    if name == "Updates":
        return expected_updates(fuzzed, request)
    if name == "Ping":
        if len(request.padding) > MAX_PING_PADDING:
            return RE
        if request.reply_bytes > MAX_PING_PADDING:
            return I
        return OK if request.worker_id == 0 else fuzzed.identity_code(request.worker_id, request.member_secret)
    if name == "Report":
        return expected_report(request)
    if name == "SetPolicy":
        return expected_set_policy(request)
    if name == "Decisions":
        return expected_decisions(fuzzed)
    assert name == "GetState", name
    return OK  # no field of its can make it invalid


def fuzz_corrupt_bytes(examples: int) -> None:
    """Every RPC of both services gets truncated, bit-flipped and random request bytes: bytes
    that do not parse get INVALID_ARGUMENT; bytes that do are the request they decode to, and
    get exactly the status the reference rules give it (no "anything but a crash")."""
    with fuzzed_cluster() as fuzzed:
        methods = [("/wanps.v1.ParameterServer/" + name, fuzzed.raw_server, spec, fuzzed.server_state)
                   for name, spec in SERVER_METHODS.items()]
        controller_raw = sync_channel(fuzzed.cluster.controller_address)
        methods += [("/wanps.v1.Controller/" + name, controller_raw, spec, fuzzed.controller_state)
                    for name, spec in CONTROLLER_METHODS.items()]
        try:
            @budget(examples)
            @given(st.data())
            def property_(data):
                method, channel, (valid, streaming_in, streaming_out), state = data.draw(st.sampled_from(methods))
                raw = data.draw(corrupted(valid.SerializeToString()))
                copies = data.draw(st.integers(1, 2)) if streaming_in else 1
                parsed = parse_as(type(valid), raw)
                if parsed is None:
                    expected = I
                else:
                    expected = expected_parsed(fuzzed, method, [parsed] * copies)
                # A valid Updates stream from the current version waits for a round that
                # nothing here closes: its short deadline ends it, and that is all it may do.
                waits = expected is WAITS
                if waits:
                    expected = grpc.StatusCode.DEADLINE_EXCEEDED

                def call():
                    if streaming_in:
                        return channel.stream_unary(method)(iter([raw] * copies), timeout=10)
                    if streaming_out:
                        stream = channel.unary_stream(method)(raw, timeout=STREAM_WAIT_S if waits else 10)
                        for _ in stream:  # the first message shows the call was accepted
                            stream.cancel()
                            return None
                        return None
                    return channel.unary_unary(method)(raw, timeout=10)

                check(fuzzed, call, expected, (method, raw, parsed), state=state)

            property_()
        finally:
            controller_raw.close()


def parse_as(message_type, raw: bytes):
    """The message `raw` decodes to, or None when it does not parse."""
    try:
        return message_type.FromString(raw)
    except Exception:
        return None


# ---------------------------------------------------------------------------- controller


@st.composite
def link_samples(draw) -> pb.LinkSample:
    weird = st.floats(allow_nan=True, allow_infinity=True)
    return pb.LinkSample(
        kind=draw(st.one_of(st.integers(1, 4), st.integers(0, 2**31 - 1))),
        bytes=draw(st.one_of(st.integers(0, 10**7), st.integers(0, U64))),
        seconds=draw(st.one_of(st.floats(0, 10), weird)),
        round=draw(st.one_of(st.integers(0, 100), st.integers(0, U64))),
        unix_ns=draw(st.integers(-(2**63), 2**63 - 1)),
        grad_norm=draw(st.one_of(st.floats(0, 100), weird)),
        elements=draw(st.one_of(st.integers(0, 10**6), st.integers(0, U64))),
        direction=draw(st.one_of(st.integers(0, 2), st.integers(0, 2**31 - 1))),
        timed_bytes=draw(st.one_of(st.just(0), st.integers(0, 10**7), st.integers(0, U64))),
        queued_s=draw(st.one_of(st.just(0.0), st.floats(0, 10), weird)),
        transfer_s=draw(st.one_of(st.just(0.0), st.floats(0, 10), st.floats(3000, 5000), weird)),
        has_one_way=draw(st.booleans()),
        one_way_up_s=draw(st.one_of(st.floats(-1e6, 1e6), weird)),
        overhead_s=draw(st.one_of(st.just(0.0), st.floats(0, 10), st.floats(3000, 5000), weird)),
    )


def sample_is_valid(s: pb.LinkSample) -> bool:
    return (s.kind in (1, 2, 3, 4) and math.isfinite(s.seconds) and s.seconds >= 0
            and math.isfinite(s.grad_norm) and s.grad_norm >= 0 and s.elements <= MAX_PARAMS
            and s.direction in (0, 1, 2) and s.timed_bytes <= s.bytes and 0 <= s.queued_s <= s.seconds
            and math.isfinite(s.transfer_s) and 0 <= s.transfer_s <= 3600
            and (not s.has_one_way or math.isfinite(s.one_way_up_s))
            and math.isfinite(s.overhead_s) and 0 <= s.overhead_s <= 3600)


def expected_decisions(fuzzed: Fuzzed) -> grpc.StatusCode | None | str:
    """Any worker id may follow the decisions; the stream's first message is the decision in
    force, and before the controller's first decision (made on a first report) it waits."""
    core = fuzzed.cluster.controller.service.core
    return OK if core.book.relevant(core.reported_round) else WAITS


def expected_report(request: pb.ReportRequest) -> grpc.StatusCode | None:
    if len(request.samples) > 512:
        return RE
    if request.round > MAX_ROUND or any(s.round > MAX_ROUND for s in request.samples):
        return grpc.StatusCode.OUT_OF_RANGE  # decisions are scheduled rounds ahead of it
    if request.num_params > MAX_PARAMS or not all(sample_is_valid(s) for s in request.samples):
        return I
    return OK


def expected_set_policy(request: pb.SetPolicyRequest) -> grpc.StatusCode | None:
    valid = request.policy in POLICIES and (request.policy != "static" or
                                            (0 < request.delta <= 1 and request.tau <= MAX_TAU))
    return OK if valid else I


def fuzz_controller(examples: int) -> None:
    with fuzzed_cluster(advance=False) as fuzzed:
        ctl = fuzzed.controller
        state = fuzzed.controller_state

        @budget(examples)
        @given(st.data())
        def property_(data):
            rpc = data.draw(st.sampled_from(["Report", "SetPolicy", "GetState", "Decisions"]))
            if rpc == "Report":
                samples = data.draw(st.one_of(st.lists(link_samples(), max_size=6),
                                              st.integers(510, 514).map(lambda n: [pb.LinkSample(kind=2)] * n)))
                request = pb.ReportRequest(worker_id=data.draw(st.integers(0, U64)),
                                           round=data.draw(st.one_of(st.integers(0, 1000), st.integers(0, U64))),
                                           samples=samples, num_params=data.draw(st.integers(0, U64)))
                check(fuzzed, lambda: ctl.Report(request, timeout=10), expected_report(request), request, state=state)
            elif rpc == "SetPolicy":
                name = data.draw(st.one_of(st.sampled_from(POLICIES), st.text(max_size=12)))
                delta = data.draw(st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)))
                tau = data.draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)))
                request = pb.SetPolicyRequest(policy=name, tau=tau, delta=delta)
                code = check(fuzzed, lambda: ctl.SetPolicy(request, timeout=10), expected_set_policy(request),
                             request, state=state)
                if code is OK:
                    assert fuzzed.cluster.controller.service.core.policy.name == name
            elif rpc == "GetState":
                check(fuzzed, lambda: ctl.GetState(pb.GetStateRequest(), timeout=10), OK, rpc, state=state)
            else:
                request = pb.DecisionsRequest(worker_id=data.draw(st.integers(0, U64)))
                expected = expected_decisions(fuzzed)
                waits = expected is WAITS  # no decision yet: the stream waits, its short deadline ends it

                def first_decision():
                    stream = ctl.Decisions(request, timeout=STREAM_WAIT_S if waits else 10)
                    next(stream)
                    stream.cancel()

                check(fuzzed, first_decision, grpc.StatusCode.DEADLINE_EXCEEDED if waits else OK, request,
                      state=state)

        property_()



FUZZERS = {
    "Push": fuzz_push,
    "Join": fuzz_join,
    "SeedModel": fuzz_seed,
    "PullModel+Updates": fuzz_pull_and_updates,
    "Ping+Leave": fuzz_ping_and_leave,
    "corrupt bytes": fuzz_corrupt_bytes,
    "Controller": fuzz_controller,
}


@pytest.mark.parametrize("rpc", FUZZERS)
def test_fuzz(rpc):
    FUZZERS[rpc](FUZZ_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rpc", FUZZERS)
def test_fuzz_long(rpc):
    FUZZERS[rpc](SLOW_EXAMPLES)

