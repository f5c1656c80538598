from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnalyzeOptions(_message.Message):
    __slots__ = ("include_fused_map", "include_t2w_preview", "include_dicom_outputs", "study_instance_uid", "include_cspca_map")
    INCLUDE_FUSED_MAP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_T2W_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DICOM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CSPCA_MAP_FIELD_NUMBER: _ClassVar[int]
    include_fused_map: bool
    include_t2w_preview: bool
    include_dicom_outputs: bool
    study_instance_uid: str
    include_cspca_map: bool
    def __init__(self, include_fused_map: _Optional[bool] = ..., include_t2w_preview: _Optional[bool] = ..., include_dicom_outputs: _Optional[bool] = ..., study_instance_uid: _Optional[str] = ..., include_cspca_map: _Optional[bool] = ...) -> None: ...

class AnalyzeHeader(_message.Message):
    __slots__ = ("request_id", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    options: AnalyzeOptions
    def __init__(self, request_id: _Optional[str] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ...) -> None: ...

class InstanceChunk(_message.Message):
    __slots__ = ("data", "end_of_instance")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_of_instance: bool
    def __init__(self, data: _Optional[bytes] = ..., end_of_instance: _Optional[bool] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: AnalyzeHeader
    chunks: _containers.RepeatedCompositeFieldContainer[InstanceChunk]
    def __init__(self, header: _Optional[_Union[AnalyzeHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[InstanceChunk, _Mapping]]] = ...) -> None: ...

class AnalyzeReferenceRequest(_message.Message):
    __slots__ = ("request_id", "dicomweb_url", "study_instance_uid", "options", "store_results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DICOMWEB_URL_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STORE_RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dicomweb_url: str
    study_instance_uid: str
    options: AnalyzeOptions
    store_results: bool
    def __init__(self, request_id: _Optional[str] = ..., dicomweb_url: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ..., store_results: _Optional[bool] = ...) -> None: ...

class SeriesChoice(_message.Message):
    __slots__ = ("sequence", "series_instance_uid", "series_description", "reason", "b_value_s_per_mm2")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    B_VALUE_S_PER_MM2_FIELD_NUMBER: _ClassVar[int]
    sequence: str
    series_instance_uid: str
    series_description: str
    reason: str
    b_value_s_per_mm2: float
    def __init__(self, sequence: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., series_description: _Optional[str] = ..., reason: _Optional[str] = ..., b_value_s_per_mm2: _Optional[float] = ...) -> None: ...

class Lesion(_message.Message):
    __slots__ = ("id", "center_lps_mm", "volume_ml", "likelihood", "pirads", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    CENTER_LPS_MM_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    PIRADS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: int
    center_lps_mm: _containers.RepeatedScalarFieldContainer[float]
    volume_ml: float
    likelihood: float
    pirads: int
    score: float
    def __init__(self, id: _Optional[int] = ..., center_lps_mm: _Optional[_Iterable[float]] = ..., volume_ml: _Optional[float] = ..., likelihood: _Optional[float] = ..., pirads: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class GridVolume(_message.Message):
    __slots__ = ("origin_lps_mm", "direction", "spacing_mm_ijk", "size_ijk", "float16_dhw")
    ORIGIN_LPS_MM_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SPACING_MM_IJK_FIELD_NUMBER: _ClassVar[int]
    SIZE_IJK_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_DHW_FIELD_NUMBER: _ClassVar[int]
    origin_lps_mm: _containers.RepeatedScalarFieldContainer[float]
    direction: _containers.RepeatedScalarFieldContainer[float]
    spacing_mm_ijk: _containers.RepeatedScalarFieldContainer[float]
    size_ijk: _containers.RepeatedScalarFieldContainer[int]
    float16_dhw: bytes
    def __init__(self, origin_lps_mm: _Optional[_Iterable[float]] = ..., direction: _Optional[_Iterable[float]] = ..., spacing_mm_ijk: _Optional[_Iterable[float]] = ..., size_ijk: _Optional[_Iterable[int]] = ..., float16_dhw: _Optional[bytes] = ...) -> None: ...

class DicomObject(_message.Message):
    __slots__ = ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "data")
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    data: bytes
    def __init__(self, sop_class_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("request_id", "study_instance_uid", "series", "availability", "cspca_probability", "pirads_score", "pirads_distribution", "lesions", "warnings", "model_name", "model_version", "timings_s", "fused_map", "t2w_preview", "seg", "sr", "num_instances", "results_stored", "cspca_map")
    class AvailabilityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    CSPCA_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PIRADS_SCORE_FIELD_NUMBER: _ClassVar[int]
    PIRADS_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LESIONS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    FUSED_MAP_FIELD_NUMBER: _ClassVar[int]
    T2W_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    SEG_FIELD_NUMBER: _ClassVar[int]
    SR_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_STORED_FIELD_NUMBER: _ClassVar[int]
    CSPCA_MAP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    study_instance_uid: str
    series: _containers.RepeatedCompositeFieldContainer[SeriesChoice]
    availability: _containers.ScalarMap[str, bool]
    cspca_probability: float
    pirads_score: int
    pirads_distribution: _containers.RepeatedScalarFieldContainer[float]
    lesions: _containers.RepeatedCompositeFieldContainer[Lesion]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: str
    timings_s: _containers.ScalarMap[str, float]
    fused_map: GridVolume
    t2w_preview: GridVolume
    seg: DicomObject
    sr: DicomObject
    num_instances: int
    results_stored: bool
    cspca_map: GridVolume
    def __init__(self, request_id: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series: _Optional[_Iterable[_Union[SeriesChoice, _Mapping]]] = ..., availability: _Optional[_Mapping[str, bool]] = ..., cspca_probability: _Optional[float] = ..., pirads_score: _Optional[int] = ..., pirads_distribution: _Optional[_Iterable[float]] = ..., lesions: _Optional[_Iterable[_Union[Lesion, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., fused_map: _Optional[_Union[GridVolume, _Mapping]] = ..., t2w_preview: _Optional[_Union[GridVolume, _Mapping]] = ..., seg: _Optional[_Union[DicomObject, _Mapping]] = ..., sr: _Optional[_Union[DicomObject, _Mapping]] = ..., num_instances: _Optional[int] = ..., results_stored: _Optional[bool] = ..., cspca_map: _Optional[_Union[GridVolume, _Mapping]] = ...) -> None: ...
