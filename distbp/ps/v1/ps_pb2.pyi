from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data", "padding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    padding: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_name", "requested_id", "signature", "settings")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    requested_id: int
    signature: str
    settings: str
    def __init__(self, worker_name: _Optional[str] = ..., requested_id: _Optional[int] = ..., signature: _Optional[str] = ..., settings: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "num_workers", "version", "mode", "shard", "num_shards", "registration", "steps")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    num_workers: int
    version: int
    mode: str
    shard: int
    num_shards: int
    registration: int
    steps: int
    def __init__(self, worker_id: _Optional[int] = ..., num_workers: _Optional[int] = ..., version: _Optional[int] = ..., mode: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., registration: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("worker_id", "version", "chunk", "sequence", "registration", "step")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    version: int
    chunk: TensorChunk
    sequence: int
    registration: int
    step: int
    def __init__(self, worker_id: _Optional[int] = ..., version: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., sequence: _Optional[int] = ..., registration: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "min_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    min_version: int
    def __init__(self, worker_id: _Optional[int] = ..., min_version: _Optional[int] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("version", "chunk")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk: TensorChunk
    def __init__(self, version: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "mode", "workers", "pushes", "shard", "num_shards", "parameters", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    mode: str
    workers: _containers.RepeatedScalarFieldContainer[int]
    pushes: int
    shard: int
    num_shards: int
    parameters: _containers.RepeatedScalarFieldContainer[str]
    signature: str
    def __init__(self, version: _Optional[int] = ..., mode: _Optional[str] = ..., workers: _Optional[_Iterable[int]] = ..., pushes: _Optional[int] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., parameters: _Optional[_Iterable[str]] = ..., signature: _Optional[str] = ...) -> None: ...
