"""A Python-based Triton backend named ``onnxruntime`` for servers without ``libtriton_onnxruntime.so``.

Triton loads ``<backend-directory>/onnxruntime/model.py`` through the Python backend when the native
onnxruntime backend is absent (nvidia-pytriton's CPU ``tritonserver``). The model repository stays the one
an NGC Triton serves with the real onnxruntime backend: ``<model>/<version>/model.onnx`` and a
``config.pbtxt`` with ``backend: "onnxruntime"``.

Honoured ``parameters`` (string values, same keys as the native backend where it has them):

* ``intra_op_thread_count``, ``inter_op_thread_count``: onnxruntime thread pools (0 = onnxruntime default).
* ``execution_mode``: ``0`` sequential, ``1`` parallel.
* ``session.*``: any onnxruntime session config entry, e.g. ``session.intra_op.allow_spinning = "0"``.

Requests of one ``execute`` call (dynamic batching) are concatenated along the batch axis, run once and
split again, so the batch the onnxruntime session sees is the batch Triton formed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key)
    if value is None:
        return default
    return str(value.get("string_value", default))


class TritonPythonModel:
    """Runs one ONNX model with onnxruntime; inputs and outputs as declared in the model config."""

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{config['name']}: model file {path} is missing (run mpmri export)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_thread_count", "0"))
        if _parameter(config, "execution_mode", "0") == "1":
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        for key, value in config.get("parameters", {}).items():
            if key.startswith("session."):
                options.add_session_config_entry(key, str(value.get("string_value", "")))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}), *providers]
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        missing = (set(self.input_names) - session_inputs) | (set(self.output_names) - session_outputs)
        if missing:
            raise pb_utils.TritonModelException(f"{config['name']}: {path} lacks tensors {sorted(missing)}")
        self.output_dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in self.output_names
        }

    def execute(self, requests: list[Any]) -> list[Any]:
        per_request = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        if len(per_request) == 1 or not self.batched:
            feeds_list = per_request
        else:
            feeds_list = [{name: np.concatenate([r[name] for r in per_request], axis=0) for name in self.input_names}]
        results = [self.session.run(self.output_names, feeds) for feeds in feeds_list]
        responses = []
        if len(feeds_list) == len(per_request):
            for outputs in results:
                responses.append(self._response(outputs))
            return responses
        offsets = np.cumsum([r[self.input_names[0]].shape[0] for r in per_request])[:-1]
        split = [np.split(out, offsets, axis=0) for out in results[0]]
        for i in range(len(per_request)):
            responses.append(self._response([parts[i] for parts in split]))
        return responses

    def _response(self, outputs: list[np.ndarray]) -> Any:
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(out, dtype=self.output_dtypes[name]))
            for name, out in zip(self.output_names, outputs, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.session = None
