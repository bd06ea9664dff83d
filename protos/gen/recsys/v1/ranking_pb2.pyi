from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANKING_MODE_UNSPECIFIED: _ClassVar[RankingMode]
    RANKING_MODE_SCORE: _ClassVar[RankingMode]
    RANKING_MODE_GENERATE: _ClassVar[RankingMode]
RANKING_MODE_UNSPECIFIED: RankingMode
RANKING_MODE_SCORE: RankingMode
RANKING_MODE_GENERATE: RankingMode

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history", "k", "mode", "num_candidates", "exclude", "request_id", "as_of_unix_s")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    mode: RankingMode
    num_candidates: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    as_of_unix_s: int
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., mode: _Optional[_Union[RankingMode, str]] = ..., num_candidates: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., as_of_unix_s: _Optional[int] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "title", "score", "rank", "retrieval_rank")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_RANK_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    score: float
    rank: int
    retrieval_rank: int
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., retrieval_rank: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("retrieval_ms", "queue_ms", "ranking_ms", "total_ms")
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    RANKING_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    retrieval_ms: float
    queue_ms: float
    ranking_ms: float
    total_ms: float
    def __init__(self, retrieval_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., ranking_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "timings", "degraded", "degraded_reason", "cold_start", "model_version", "request_id", "mode")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    timings: StageTimings
    degraded: bool
    degraded_reason: str
    cold_start: bool
    model_version: str
    request_id: str
    mode: RankingMode
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., cold_start: _Optional[bool] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., mode: _Optional[_Union[RankingMode, str]] = ...) -> None: ...
