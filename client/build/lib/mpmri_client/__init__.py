"""mpmri-client: the client of the mpmri-serve analysis service (gRPC ``mpmri.v1.AnalysisService``)."""

from mpmri_client.api import AnalysisClient, AsyncAnalysisClient, ChannelOptions, read_instances, request_stream
from mpmri_client.results import response_to_dict, write_outputs
from mpmri_client.v1 import analysis_pb2, analysis_pb2_grpc

__all__ = [
    "AnalysisClient",
    "AsyncAnalysisClient",
    "ChannelOptions",
    "analysis_pb2",
    "analysis_pb2_grpc",
    "read_instances",
    "request_stream",
    "response_to_dict",
    "write_outputs",
]
