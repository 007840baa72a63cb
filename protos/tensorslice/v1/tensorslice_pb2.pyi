from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Combine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTER: _ClassVar[Combine]
    VECTORIZED: _ClassVar[Combine]
OUTER: Combine
VECTORIZED: Combine

class OpenUploadRequest(_message.Message):
    __slots__ = ("name", "replace", "dim_names", "append", "header")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    name: str
    replace: bool
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    append: bool
    header: bytes
    def __init__(self, name: _Optional[str] = ..., replace: _Optional[bool] = ..., dim_names: _Optional[_Iterable[str]] = ..., append: _Optional[bool] = ..., header: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("name", "replace", "dim_names", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    replace: bool
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., replace: _Optional[bool] = ..., dim_names: _Optional[_Iterable[str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListTensorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTensorsResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class DescribeTensorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "device", "nbytes", "dim_names", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    nbytes: int
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., nbytes: _Optional[int] = ..., dim_names: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class Full(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Range(_message.Message):
    __slots__ = ("start", "stop", "step")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    step: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class Index(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class Indices(_message.Message):
    __slots__ = ("values", "shape")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("values", "shape", "scalar", "counts_as_one")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    COUNTS_AS_ONE_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    scalar: bool
    counts_as_one: bool
    def __init__(self, values: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., scalar: _Optional[bool] = ..., counts_as_one: _Optional[bool] = ...) -> None: ...

class Threshold(_message.Message):
    __slots__ = ("stat", "over", "op", "value", "scope", "k")
    class Stat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAT_UNSPECIFIED: _ClassVar[Threshold.Stat]
        MEAN: _ClassVar[Threshold.Stat]
        MAX: _ClassVar[Threshold.Stat]
        MIN: _ClassVar[Threshold.Stat]
        SUM: _ClassVar[Threshold.Stat]
        ABS_MEAN: _ClassVar[Threshold.Stat]
        L2: _ClassVar[Threshold.Stat]
    STAT_UNSPECIFIED: Threshold.Stat
    MEAN: Threshold.Stat
    MAX: Threshold.Stat
    MIN: Threshold.Stat
    SUM: Threshold.Stat
    ABS_MEAN: Threshold.Stat
    L2: Threshold.Stat
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Threshold.Op]
        GT: _ClassVar[Threshold.Op]
        GE: _ClassVar[Threshold.Op]
        LT: _ClassVar[Threshold.Op]
        LE: _ClassVar[Threshold.Op]
    OP_UNSPECIFIED: Threshold.Op
    GT: Threshold.Op
    GE: Threshold.Op
    LT: Threshold.Op
    LE: Threshold.Op
    class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SCOPE_UNSPECIFIED: _ClassVar[Threshold.Scope]
        ANY: _ClassVar[Threshold.Scope]
        ALL: _ClassVar[Threshold.Scope]
        PER_SAMPLE: _ClassVar[Threshold.Scope]
        TOPK: _ClassVar[Threshold.Scope]
    SCOPE_UNSPECIFIED: Threshold.Scope
    ANY: Threshold.Scope
    ALL: Threshold.Scope
    PER_SAMPLE: Threshold.Scope
    TOPK: Threshold.Scope
    STAT_FIELD_NUMBER: _ClassVar[int]
    OVER_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    stat: Threshold.Stat
    over: _containers.RepeatedScalarFieldContainer[int]
    op: Threshold.Op
    value: float
    scope: Threshold.Scope
    k: int
    def __init__(self, stat: _Optional[_Union[Threshold.Stat, str]] = ..., over: _Optional[_Iterable[int]] = ..., op: _Optional[_Union[Threshold.Op, str]] = ..., value: _Optional[float] = ..., scope: _Optional[_Union[Threshold.Scope, str]] = ..., k: _Optional[int] = ...) -> None: ...

class NewAxis(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Ellipsis(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Selector(_message.Message):
    __slots__ = ("full", "range", "index", "indices", "mask", "threshold", "new_axis", "ellipsis")
    FULL_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEW_AXIS_FIELD_NUMBER: _ClassVar[int]
    ELLIPSIS_FIELD_NUMBER: _ClassVar[int]
    full: Full
    range: Range
    index: Index
    indices: Indices
    mask: Mask
    threshold: Threshold
    new_axis: NewAxis
    ellipsis: Ellipsis
    def __init__(self, full: _Optional[_Union[Full, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ..., index: _Optional[_Union[Index, _Mapping]] = ..., indices: _Optional[_Union[Indices, _Mapping]] = ..., mask: _Optional[_Union[Mask, _Mapping]] = ..., threshold: _Optional[_Union[Threshold, _Mapping]] = ..., new_axis: _Optional[_Union[NewAxis, _Mapping]] = ..., ellipsis: _Optional[_Union[Ellipsis, _Mapping]] = ...) -> None: ...

class SliceRequest(_message.Message):
    __slots__ = ("tensor", "selectors", "combine", "dtype", "max_bytes", "bulk", "version")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    combine: Combine
    dtype: str
    max_bytes: int
    bulk: bool
    version: int
    def __init__(self, tensor: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., combine: _Optional[_Union[Combine, str]] = ..., dtype: _Optional[str] = ..., max_bytes: _Optional[int] = ..., bulk: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class NamedSlice(_message.Message):
    __slots__ = ("key", "request")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    key: str
    request: SliceRequest
    def __init__(self, key: _Optional[str] = ..., request: _Optional[_Union[SliceRequest, _Mapping]] = ...) -> None: ...

class SliceManyRequest(_message.Message):
    __slots__ = ("items", "max_bytes", "bulk")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[NamedSlice]
    max_bytes: int
    bulk: bool
    def __init__(self, items: _Optional[_Iterable[_Union[NamedSlice, _Mapping]]] = ..., max_bytes: _Optional[int] = ..., bulk: _Optional[bool] = ...) -> None: ...

class SliceChunk(_message.Message):
    __slots__ = ("data", "ticket")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    ticket: BulkTicket
    def __init__(self, data: _Optional[bytes] = ..., ticket: _Optional[_Union[BulkTicket, _Mapping]] = ...) -> None: ...

class BulkTicket(_message.Message):
    __slots__ = ("port", "token", "nbytes", "host", "instance")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    nbytes: int
    host: str
    instance: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ..., nbytes: _Optional[int] = ..., host: _Optional[str] = ..., instance: _Optional[bytes] = ...) -> None: ...

class PlanStep(_message.Message):
    __slots__ = ("kind", "dim", "detail", "bytes_moved", "order")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dim: int
    detail: str
    bytes_moved: int
    order: int
    def __init__(self, kind: _Optional[str] = ..., dim: _Optional[int] = ..., detail: _Optional[str] = ..., bytes_moved: _Optional[int] = ..., order: _Optional[int] = ...) -> None: ...

class SlicePlan(_message.Message):
    __slots__ = ("steps", "result_shape", "result_dtype", "result_nbytes", "zero_copy", "summary")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESULT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    RESULT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESULT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    ZERO_COPY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[PlanStep]
    result_shape: _containers.RepeatedScalarFieldContainer[int]
    result_dtype: str
    result_nbytes: int
    zero_copy: bool
    summary: str
    def __init__(self, steps: _Optional[_Iterable[_Union[PlanStep, _Mapping]]] = ..., result_shape: _Optional[_Iterable[int]] = ..., result_dtype: _Optional[str] = ..., result_nbytes: _Optional[int] = ..., zero_copy: _Optional[bool] = ..., summary: _Optional[str] = ...) -> None: ...
