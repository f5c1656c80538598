"""Embedded CPU Triton server (nvidia-pytriton's tritonserver) and perf_analyzer runs."""
