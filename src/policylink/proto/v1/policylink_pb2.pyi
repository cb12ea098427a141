from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "jpeg", "text", "number", "map")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    jpeg: bytes
    text: str
    number: float
    map: Fields
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., jpeg: _Optional[bytes] = ..., text: _Optional[str] = ..., number: _Optional[float] = ..., map: _Optional[_Union[Fields, _Mapping]] = ...) -> None: ...

class Fields(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, Value]
    def __init__(self, fields: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("fields", "step", "rtc", "seed")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RTC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, Value]
    step: int
    rtc: RealTimeChunking
    seed: int
    def __init__(self, fields: _Optional[_Mapping[str, Value]] = ..., step: _Optional[int] = ..., rtc: _Optional[_Union[RealTimeChunking, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class RealTimeChunking(_message.Message):
    __slots__ = ("prefix", "delay", "execution_horizon", "guidance", "schedule")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_HORIZON_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    prefix: Tensor
    delay: int
    execution_horizon: int
    guidance: float
    schedule: str
    def __init__(self, prefix: _Optional[_Union[Tensor, _Mapping]] = ..., delay: _Optional[int] = ..., execution_horizon: _Optional[int] = ..., guidance: _Optional[float] = ..., schedule: _Optional[str] = ...) -> None: ...

class ActionChunk(_message.Message):
    __slots__ = ("actions", "server_timing", "step", "error", "error_kind")
    class ServerTimingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIMING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    actions: Tensor
    server_timing: _containers.ScalarMap[str, float]
    step: int
    error: str
    error_kind: str
    def __init__(self, actions: _Optional[_Union[Tensor, _Mapping]] = ..., server_timing: _Optional[_Mapping[str, float]] = ..., step: _Optional[int] = ..., error: _Optional[str] = ..., error_kind: _Optional[str] = ...) -> None: ...

class FeatureSpec(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("status", "model_id", "policy_type", "action_dim", "horizon", "n_action_steps", "fps", "input_features", "camera_names", "description", "action_space", "message", "session_id", "max_message_bytes", "action_low", "action_high", "rtc", "control")
    class InputFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureSpec
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureSpec, _Mapping]] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    N_ACTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CAMERA_NAMES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPACE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    RTC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    status: str
    model_id: str
    policy_type: str
    action_dim: int
    horizon: int
    n_action_steps: int
    fps: float
    input_features: _containers.MessageMap[str, FeatureSpec]
    camera_names: _containers.RepeatedScalarFieldContainer[str]
    description: str
    action_space: str
    message: str
    session_id: str
    max_message_bytes: int
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    rtc: RealTimeChunkingSupport
    control: ActionSpace
    def __init__(self, status: _Optional[str] = ..., model_id: _Optional[str] = ..., policy_type: _Optional[str] = ..., action_dim: _Optional[int] = ..., horizon: _Optional[int] = ..., n_action_steps: _Optional[int] = ..., fps: _Optional[float] = ..., input_features: _Optional[_Mapping[str, FeatureSpec]] = ..., camera_names: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., action_space: _Optional[str] = ..., message: _Optional[str] = ..., session_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ..., rtc: _Optional[_Union[RealTimeChunkingSupport, _Mapping]] = ..., control: _Optional[_Union[ActionSpace, _Mapping]] = ...) -> None: ...

class ActionSpace(_message.Message):
    __slots__ = ("ctrl_space", "ctrl_type", "absolute_dims", "gripper_continuous")
    CTRL_SPACE_FIELD_NUMBER: _ClassVar[int]
    CTRL_TYPE_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_DIMS_FIELD_NUMBER: _ClassVar[int]
    GRIPPER_CONTINUOUS_FIELD_NUMBER: _ClassVar[int]
    ctrl_space: str
    ctrl_type: str
    absolute_dims: _containers.RepeatedScalarFieldContainer[int]
    gripper_continuous: bool
    def __init__(self, ctrl_space: _Optional[str] = ..., ctrl_type: _Optional[str] = ..., absolute_dims: _Optional[_Iterable[int]] = ..., gripper_continuous: bool = ...) -> None: ...

class RealTimeChunkingSupport(_message.Message):
    __slots__ = ("guidance", "max_guidance", "schedule", "execution_horizon")
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_HORIZON_FIELD_NUMBER: _ClassVar[int]
    guidance: float
    max_guidance: float
    schedule: str
    execution_horizon: int
    def __init__(self, guidance: _Optional[float] = ..., max_guidance: _Optional[float] = ..., schedule: _Optional[str] = ..., execution_horizon: _Optional[int] = ...) -> None: ...

class MetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("policy_path", "device", "dtype", "prompt", "rename_map", "fps")
    class RenameMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RENAME_MAP_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    policy_path: str
    device: str
    dtype: str
    prompt: str
    rename_map: _containers.ScalarMap[str, str]
    fps: float
    def __init__(self, policy_path: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., prompt: _Optional[str] = ..., rename_map: _Optional[_Mapping[str, str]] = ..., fps: _Optional[float] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
