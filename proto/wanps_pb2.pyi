from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_SPARSE: _ClassVar[Codec]
    CODEC_DENSE: _ClassVar[Codec]
    CODEC_RANDOM_BLOCK: _ClassVar[Codec]

class ValueDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_DTYPE_UNSPECIFIED: _ClassVar[ValueDtype]
    VALUE_DTYPE_FLOAT32: _ClassVar[ValueDtype]
    VALUE_DTYPE_FLOAT16: _ClassVar[ValueDtype]
    VALUE_DTYPE_BFLOAT16: _ClassVar[ValueDtype]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]
    ROLE_OBSERVER: _ClassVar[Role]

class TensorRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_ROLE_UNSPECIFIED: _ClassVar[TensorRole]
    TENSOR_ROLE_TRAINABLE: _ClassVar[TensorRole]
    TENSOR_ROLE_FROZEN: _ClassVar[TensorRole]
    TENSOR_ROLE_BUFFER: _ClassVar[TensorRole]
    TENSOR_ROLE_INT_BUFFER: _ClassVar[TensorRole]
CODEC_UNSPECIFIED: Codec
CODEC_SPARSE: Codec
CODEC_DENSE: Codec
CODEC_RANDOM_BLOCK: Codec
VALUE_DTYPE_UNSPECIFIED: ValueDtype
VALUE_DTYPE_FLOAT32: ValueDtype
VALUE_DTYPE_FLOAT16: ValueDtype
VALUE_DTYPE_BFLOAT16: ValueDtype
ROLE_UNSPECIFIED: Role
ROLE_WORKER: Role
ROLE_OBSERVER: Role
TENSOR_ROLE_UNSPECIFIED: TensorRole
TENSOR_ROLE_TRAINABLE: TensorRole
TENSOR_ROLE_FROZEN: TensorRole
TENSOR_ROLE_BUFFER: TensorRole
TENSOR_ROLE_INT_BUFFER: TensorRole

class JoinRequest(_message.Message):
    __slots__ = ("role", "num_params", "model_fingerprint", "name", "structure", "shard_index", "shard_count", "total_params")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    role: Role
    num_params: int
    model_fingerprint: bytes
    name: str
    structure: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    shard_index: int
    shard_count: int
    total_params: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., num_params: _Optional[int] = ..., model_fingerprint: _Optional[bytes] = ..., name: _Optional[str] = ..., structure: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., total_params: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    role: TensorRole
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., role: _Optional[_Union[TensorRole, str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "rank", "world_size", "version", "must_seed", "tau_max", "first_round", "incarnation", "member_secret", "shard_index", "shard_count", "range_start", "range_stop", "total_params")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MUST_SEED_FIELD_NUMBER: _ClassVar[int]
    TAU_MAX_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    RANGE_START_FIELD_NUMBER: _ClassVar[int]
    RANGE_STOP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    rank: int
    world_size: int
    version: int
    must_seed: bool
    tau_max: int
    first_round: int
    incarnation: int
    member_secret: bytes
    shard_index: int
    shard_count: int
    range_start: int
    range_stop: int
    total_params: int
    def __init__(self, worker_id: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., version: _Optional[int] = ..., must_seed: _Optional[bool] = ..., tau_max: _Optional[int] = ..., first_round: _Optional[int] = ..., incarnation: _Optional[int] = ..., member_secret: _Optional[bytes] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., range_start: _Optional[int] = ..., range_stop: _Optional[int] = ..., total_params: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("worker_id", "version", "num_params", "offset", "values", "rank", "world_size", "first_round", "model_checksum", "member_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    version: int
    num_params: int
    offset: int
    values: bytes
    rank: int
    world_size: int
    first_round: int
    model_checksum: int
    member_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., version: _Optional[int] = ..., num_params: _Optional[int] = ..., offset: _Optional[int] = ..., values: _Optional[bytes] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., first_round: _Optional[int] = ..., model_checksum: _Optional[int] = ..., member_secret: _Optional[bytes] = ...) -> None: ...

class SeedModelReply(_message.Message):
    __slots__ = ("version", "model_checksum")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_checksum: int
    def __init__(self, version: _Optional[int] = ..., model_checksum: _Optional[int] = ...) -> None: ...

class PullModelRequest(_message.Message):
    __slots__ = ("worker_id", "member_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    member_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., member_secret: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "round", "computed_at_version", "skip", "codec", "value_dtype", "count", "block_start", "member_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    round: int
    computed_at_version: int
    skip: bool
    codec: Codec
    value_dtype: ValueDtype
    count: int
    block_start: int
    member_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., round: _Optional[int] = ..., computed_at_version: _Optional[int] = ..., skip: _Optional[bool] = ..., codec: _Optional[_Union[Codec, str]] = ..., value_dtype: _Optional[_Union[ValueDtype, str]] = ..., count: _Optional[int] = ..., block_start: _Optional[int] = ..., member_secret: _Optional[bytes] = ...) -> None: ...

class SparseChunk(_message.Message):
    __slots__ = ("indices", "values")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    indices: bytes
    values: bytes
    def __init__(self, indices: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class PushMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: SparseChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[SparseChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("duplicate", "version", "late", "durable_version", "snapshot_version", "received_ns")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    version: int
    late: bool
    durable_version: int
    snapshot_version: int
    received_ns: int
    def __init__(self, duplicate: _Optional[bool] = ..., version: _Optional[int] = ..., late: _Optional[bool] = ..., durable_version: _Optional[int] = ..., snapshot_version: _Optional[int] = ..., received_ns: _Optional[int] = ...) -> None: ...

class UpdatesRequest(_message.Message):
    __slots__ = ("worker_id", "from_version", "member_secret", "downlink_delta", "stream_key")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_DELTA_FIELD_NUMBER: _ClassVar[int]
    STREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    from_version: int
    member_secret: bytes
    downlink_delta: float
    stream_key: int
    def __init__(self, worker_id: _Optional[int] = ..., from_version: _Optional[int] = ..., member_secret: _Optional[bytes] = ..., downlink_delta: _Optional[float] = ..., stream_key: _Optional[int] = ...) -> None: ...

class SetDownlinkRequest(_message.Message):
    __slots__ = ("worker_id", "member_secret", "stream_key", "downlink_delta")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    STREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_DELTA_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    member_secret: bytes
    stream_key: int
    downlink_delta: float
    def __init__(self, worker_id: _Optional[int] = ..., member_secret: _Optional[bytes] = ..., stream_key: _Optional[int] = ..., downlink_delta: _Optional[float] = ...) -> None: ...

class SetDownlinkReply(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DeltaChunk(_message.Message):
    __slots__ = ("round", "version", "total_count", "indices", "values", "last", "has_model_checksum", "model_checksum", "pushed", "skipped", "dense", "has_follower_checksum", "follower_checksum", "sent_ns", "downlink_delta")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    HAS_MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    HAS_FOLLOWER_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    FOLLOWER_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SENT_NS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_DELTA_FIELD_NUMBER: _ClassVar[int]
    round: int
    version: int
    total_count: int
    indices: bytes
    values: bytes
    last: bool
    has_model_checksum: bool
    model_checksum: int
    pushed: int
    skipped: int
    dense: bool
    has_follower_checksum: bool
    follower_checksum: int
    sent_ns: int
    downlink_delta: float
    def __init__(self, round: _Optional[int] = ..., version: _Optional[int] = ..., total_count: _Optional[int] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., last: _Optional[bool] = ..., has_model_checksum: _Optional[bool] = ..., model_checksum: _Optional[int] = ..., pushed: _Optional[int] = ..., skipped: _Optional[int] = ..., dense: _Optional[bool] = ..., has_follower_checksum: _Optional[bool] = ..., follower_checksum: _Optional[int] = ..., sent_ns: _Optional[int] = ..., downlink_delta: _Optional[float] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("worker_id", "sent_unix_ns", "padding", "member_secret", "reply_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    sent_unix_ns: int
    padding: bytes
    member_secret: bytes
    reply_bytes: int
    def __init__(self, worker_id: _Optional[int] = ..., sent_unix_ns: _Optional[int] = ..., padding: _Optional[bytes] = ..., member_secret: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("sent_unix_ns", "version", "padding", "shard_index", "shard_count", "received_ns")
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ns: int
    version: int
    padding: bytes
    shard_index: int
    shard_count: int
    received_ns: int
    def __init__(self, sent_unix_ns: _Optional[int] = ..., version: _Optional[int] = ..., padding: _Optional[bytes] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., received_ns: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "member_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    member_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., member_secret: _Optional[bytes] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("last_round",)
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    last_round: int
    def __init__(self, last_round: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("worker_id", "member_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    member_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., member_secret: _Optional[bytes] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("member", "version", "model_checksum", "held_rounds", "first_round", "incarnation")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    HELD_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    member: bool
    version: int
    model_checksum: int
    held_rounds: _containers.RepeatedScalarFieldContainer[int]
    first_round: int
    incarnation: int
    def __init__(self, member: _Optional[bool] = ..., version: _Optional[int] = ..., model_checksum: _Optional[int] = ..., held_rounds: _Optional[_Iterable[int]] = ..., first_round: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class DecisionsRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    def __init__(self, worker_id: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("decision_id", "from_round", "tau", "delta", "policy", "reason", "worker_delta", "predicted_iter_s", "worker_downlink_delta")
    class WorkerDeltaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class WorkerDownlinkDeltaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_DELTA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ITER_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_DOWNLINK_DELTA_FIELD_NUMBER: _ClassVar[int]
    decision_id: int
    from_round: int
    tau: int
    delta: float
    policy: str
    reason: str
    worker_delta: _containers.ScalarMap[int, float]
    predicted_iter_s: float
    worker_downlink_delta: _containers.ScalarMap[int, float]
    def __init__(self, decision_id: _Optional[int] = ..., from_round: _Optional[int] = ..., tau: _Optional[int] = ..., delta: _Optional[float] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ..., worker_delta: _Optional[_Mapping[int, float]] = ..., predicted_iter_s: _Optional[float] = ..., worker_downlink_delta: _Optional[_Mapping[int, float]] = ...) -> None: ...

class LinkSample(_message.Message):
    __slots__ = ("kind", "bytes", "seconds", "round", "unix_ns", "grad_norm", "elements", "direction", "timed_bytes", "queued_s", "transfer_s", "has_one_way", "one_way_up_s", "overhead_s")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[LinkSample.Kind]
        KIND_PUSH: _ClassVar[LinkSample.Kind]
        KIND_PING: _ClassVar[LinkSample.Kind]
        KIND_COMPUTE: _ClassVar[LinkSample.Kind]
        KIND_DOWNLOAD: _ClassVar[LinkSample.Kind]
    KIND_UNSPECIFIED: LinkSample.Kind
    KIND_PUSH: LinkSample.Kind
    KIND_PING: LinkSample.Kind
    KIND_COMPUTE: LinkSample.Kind
    KIND_DOWNLOAD: LinkSample.Kind
    class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DIRECTION_UNSPECIFIED: _ClassVar[LinkSample.Direction]
        DIRECTION_UP: _ClassVar[LinkSample.Direction]
        DIRECTION_DOWN: _ClassVar[LinkSample.Direction]
    DIRECTION_UNSPECIFIED: LinkSample.Direction
    DIRECTION_UP: LinkSample.Direction
    DIRECTION_DOWN: LinkSample.Direction
    KIND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TIMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    HAS_ONE_WAY_FIELD_NUMBER: _ClassVar[int]
    ONE_WAY_UP_S_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    kind: LinkSample.Kind
    bytes: int
    seconds: float
    round: int
    unix_ns: int
    grad_norm: float
    elements: int
    direction: LinkSample.Direction
    timed_bytes: int
    queued_s: float
    transfer_s: float
    has_one_way: bool
    one_way_up_s: float
    overhead_s: float
    def __init__(self, kind: _Optional[_Union[LinkSample.Kind, str]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., round: _Optional[int] = ..., unix_ns: _Optional[int] = ..., grad_norm: _Optional[float] = ..., elements: _Optional[int] = ..., direction: _Optional[_Union[LinkSample.Direction, str]] = ..., timed_bytes: _Optional[int] = ..., queued_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., has_one_way: _Optional[bool] = ..., one_way_up_s: _Optional[float] = ..., overhead_s: _Optional[float] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("worker_id", "round", "samples", "num_params")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    round: int
    samples: _containers.RepeatedCompositeFieldContainer[LinkSample]
    num_params: int
    def __init__(self, worker_id: _Optional[int] = ..., round: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[LinkSample, _Mapping]]] = ..., num_params: _Optional[int] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy", "tau", "delta")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    policy: str
    tau: int
    delta: float
    def __init__(self, policy: _Optional[str] = ..., tau: _Optional[int] = ..., delta: _Optional[float] = ...) -> None: ...

class SetPolicyReply(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerLink(_message.Message):
    __slots__ = ("worker_id", "bandwidth_bps", "latency_s", "t_comp_s", "push_samples", "ping_samples", "method", "down_bandwidth_bps", "down_samples", "down_method")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    T_COMP_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DOWN_BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    DOWN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DOWN_METHOD_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    bandwidth_bps: float
    latency_s: float
    t_comp_s: float
    push_samples: int
    ping_samples: int
    method: str
    down_bandwidth_bps: float
    down_samples: int
    down_method: str
    def __init__(self, worker_id: _Optional[int] = ..., bandwidth_bps: _Optional[float] = ..., latency_s: _Optional[float] = ..., t_comp_s: _Optional[float] = ..., push_samples: _Optional[int] = ..., ping_samples: _Optional[int] = ..., method: _Optional[str] = ..., down_bandwidth_bps: _Optional[float] = ..., down_samples: _Optional[int] = ..., down_method: _Optional[str] = ...) -> None: ...

class ControllerState(_message.Message):
    __slots__ = ("policy", "reported_round", "decisions", "links", "traffic_factor", "bits_per_element", "time_model", "overhead_s", "objective", "staleness_weight", "compression_knee")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REPORTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FACTOR_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_ELEMENT_FIELD_NUMBER: _ClassVar[int]
    TIME_MODEL_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_KNEE_FIELD_NUMBER: _ClassVar[int]
    policy: str
    reported_round: int
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    links: _containers.RepeatedCompositeFieldContainer[WorkerLink]
    traffic_factor: float
    bits_per_element: float
    time_model: str
    overhead_s: float
    objective: str
    staleness_weight: float
    compression_knee: float
    def __init__(self, policy: _Optional[str] = ..., reported_round: _Optional[int] = ..., decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[WorkerLink, _Mapping]]] = ..., traffic_factor: _Optional[float] = ..., bits_per_element: _Optional[float] = ..., time_model: _Optional[str] = ..., overhead_s: _Optional[float] = ..., objective: _Optional[str] = ..., staleness_weight: _Optional[float] = ..., compression_knee: _Optional[float] = ...) -> None: ...
