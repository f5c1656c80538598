"""The analysis service (gRPC ``mpmri.v1.AnalysisService``): a thin layer over preprocessing, Triton and
postprocessing. ``mpmri-service`` runs it against a Triton server; ``mpmri serve`` with the embedded one."""
