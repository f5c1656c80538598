"""The committed model repository configs are exactly what the contract generates, and they are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from contract import ENSEMBLE_MODEL, MODEL_IO, tensor_specs
from export.repository import (
    ALL_MODELS,
    CPU_CONFIG_NAME,
    DEFAULT_REPOSITORY,
    NETWORK_MODELS,
    parse_config,
    render_configs,
    write_configs,
)


def test_committed_configs_equal_regenerated_configs_of_the_shipped_checkpoint() -> None:
    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from postprocessing.lesion_scoring import scorer_from_metadata

    _, meta = load_checkpoint(DEFAULT_CHECKPOINT)  # the ensemble config carries the shipped lesion scorer
    rendered = render_configs(lesion_scorer=scorer_from_metadata(meta))
    committed = {
        str(p.relative_to(DEFAULT_REPOSITORY)): p.read_text()
        for p in DEFAULT_REPOSITORY.rglob("*.pbtxt")
        if "tensorrt" not in p.name  # only written by export --tensorrt
    }
    assert committed == rendered, "model_repository/ is stale: run `mpmri export` (the shipped checkpoint) and commit"
    assert (DEFAULT_REPOSITORY / ENSEMBLE_MODEL / "1").is_dir()


def test_every_config_parses_and_matches_contract_tensors(tmp_path: Path) -> None:
    write_configs(tmp_path, tensorrt=True)
    specs = tensor_specs()
    for model in ALL_MODELS:
        names = (
            ["config.pbtxt"]
            if model == ENSEMBLE_MODEL
            else ["config.pbtxt", "configs/cpu.pbtxt", "configs/tensorrt.pbtxt"]
        )
        for name in names:
            config = parse_config(tmp_path / model / name)
            assert config.name == model
            inputs, outputs = MODEL_IO[model]
            for declared, expected in ((config.input, inputs), (config.output, outputs)):
                assert [t.name for t in declared] == list(expected)
                for tensor in declared:
                    assert tuple(tensor.dims) == specs[tensor.name].shape
                    assert mc.DataType.Name(tensor.data_type) == specs[tensor.name].triton_dtype


def test_ensemble_wires_each_model_output_to_the_next_inputs() -> None:
    config = parse_config(DEFAULT_REPOSITORY / ENSEMBLE_MODEL / "config.pbtxt")
    assert config.platform == "ensemble"
    steps = list(config.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == list(NETWORK_MODELS)
    produced = {t.name for t in config.input}
    for step in steps:
        assert set(step.input_map.values()) <= produced, f"{step.model_name} reads a tensor nobody produced"
        assert set(step.input_map) == set(MODEL_IO[step.model_name][0])
        produced |= set(step.output_map.values())
    assert {t.name for t in config.output} <= produced


def test_cpu_override_is_cpu_only_and_gpu_config_keeps_production_settings() -> None:
    for model in NETWORK_MODELS:
        cpu = parse_config(DEFAULT_REPOSITORY / model / "configs" / f"{CPU_CONFIG_NAME}.pbtxt")
        gpu = parse_config(DEFAULT_REPOSITORY / model / "config.pbtxt")
        assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator
        assert cpu.parameters["session.intra_op.allow_spinning"].string_value == "0"
        assert [g.kind for g in gpu.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert [a.name for a in gpu.optimization.execution_accelerators.gpu_execution_accelerator] == ["tensorrt"]
        assert cpu.max_batch_size == gpu.max_batch_size > 1
        assert cpu.HasField("dynamic_batching") and gpu.HasField("dynamic_batching")


def test_served_contract_is_read_back_from_the_files_and_its_absence_is_named(tmp_path: Path) -> None:
    from google.protobuf import text_format

    from contract import REALISTIC_GRID
    from export.repository import served_contract

    write_configs(tmp_path / "repo", REALISTIC_GRID)
    assert served_contract(tmp_path / "repo").grid == REALISTIC_GRID
    ensemble = tmp_path / "repo" / "mpmri_ensemble" / "config.pbtxt"
    config = parse_config(ensemble)
    del config.parameters["mpmri_contract"]
    ensemble.write_text(text_format.MessageToString(config))
    with pytest.raises(ValueError, match="config.pbtxt has no 'mpmri_contract' parameter"):
        served_contract(tmp_path / "repo")
