from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveRequest(_message.Message):
    __slots__ = ("user_id", "history", "k", "exclude", "chunk_size", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score", "rank")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("candidates", "cold_start", "model_version", "history_length", "history_truncated")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    cold_start: bool
    model_version: str
    history_length: int
    history_truncated: bool
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., cold_start: _Optional[bool] = ..., model_version: _Optional[str] = ..., history_length: _Optional[int] = ..., history_truncated: _Optional[bool] = ...) -> None: ...
