"""Clients of the Triton ensemble (tritonclient gRPC/HTTP, shared memory)."""
