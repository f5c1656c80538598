"""Checkpoint -> ONNX (and TensorRT plans on GPUs) -> Triton model repository."""
