"""Training and evaluation on real synthetic studies: data targets, augmentation, smoke training, resume, evaluate."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract import MISSING_CHANNEL_FILL_VALUE, NUM_SEQUENCES, sequence_index
from mpmri.cli import main as mpmri_main
from networks.checkpoint import load_checkpoint, load_training_state
from networks.models import MpmriNetworks, build_networks
from training.baseline import BASELINES, baseline_likelihood_map, central_ellipsoid_mask
from training.data import (
    AugmentSettings,
    CaseDataset,
    CaseRecord,
    TrainingDataError,
    augment_case,
    build_cache,
    case_cache_path,
    load_case,
    lr_array_axis,
    prepare_synthetic_case,
    save_case,
)
from training.train import (
    LocalizationLoss,
    TrainConfig,
    TrainingError,
    _batches,
    _forward,
    drop_fused_map,
    lesion_balanced_recall,
    load_records,
    per_lesion_mean,
    score_loss,
    train,
)

DATA_SEED = 1234
NO_AUGMENT = AugmentSettings(
    flip_lr_probability=0.0, intensity_scale=0.0, intensity_shift=0.0, sequence_dropout_probability=0.0
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic cases of seed 1234 run through the serving preprocessing and cached."""
    out = tmp_path_factory.mktemp("cache")
    build_cache(out, DATA_SEED, range(6), progress=False)
    return out


@pytest.fixture(scope="module")
def records(cache_dir: Path) -> list[CaseRecord]:
    return [load_case(case_cache_path(cache_dir, DATA_SEED, i)) for i in range(6)]


def _config(cache_dir: Path, run_dir: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        cases=6,
        val_cases=2,
        data_seed=DATA_SEED,
        cache_dir=cache_dir,
        run_dir=run_dir,
        epochs={"localization": 2, "classification": 1, "joint": 1},
        batch_size=2,
        max_steps_per_epoch=2,
        threads=2,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_cached_case_has_contract_shapes_and_significant_only_target(records: list[CaseRecord]) -> None:
    for rec in records:
        assert rec.images.shape == (NUM_SEQUENCES, 16, 64, 64) and rec.images.dtype == np.float32
        assert rec.target.shape == rec.images.shape[1:]
        significant_labels = [i for i, les in enumerate(rec.truth["lesions"], 1) if les["significant"]]
        other_labels = [i for i, les in enumerate(rec.truth["lesions"], 1) if not les["significant"]]
        # the localization target is exactly the union of the significant lesions (PI-CAI convention)
        assert np.array_equal(rec.target > 0, np.isin(rec.lesion_index, significant_labels))
        for label in other_labels:
            assert not rec.target[rec.lesion_index == label].any()
        assert rec.significant == int(bool(significant_labels))
        assert rec.max_pirads == max([1] + [les["pirads"] for les in rec.truth["lesions"]])
    assert any(rec.significant for rec in records), "seed 1234 should contain at least one csPCa case"


def test_cache_of_another_generator_version_is_not_reused_and_is_refused(
    records: list[CaseRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data

    current = case_cache_path(tmp_path, DATA_SEED, 0)
    monkeypatch.setattr(training.data, "GENERATOR_VERSION", "0")
    old = case_cache_path(tmp_path, DATA_SEED, 0)
    save_case(old, records[0])
    monkeypatch.undo()
    assert old != current and not current.exists()  # build_cache would synthesize it again
    with pytest.raises(TrainingDataError, match="generator version '0'.*delete the cache"):
        load_case(old)
    save_case(current, records[0])
    assert load_case(current).case_id == records[0].case_id


def test_prepare_is_deterministic(records: list[CaseRecord]) -> None:
    again = prepare_synthetic_case(DATA_SEED, 0)
    assert np.array_equal(again.images, records[0].images)
    assert np.array_equal(again.target, records[0].target)


def test_sequence_dropout_never_drops_t2w_and_fills_missing_value(records: list[CaseRecord]) -> None:
    rec = records[0]
    settings = AugmentSettings(flip_lr_probability=0.0, sequence_dropout_probability=1.0)
    images, availability, _ = augment_case(
        rec.images, rec.availability, rec.target, rec.geometry, settings, np.random.default_rng(0)
    )
    assert availability[sequence_index("t2w")] == 1.0
    for name in ("adc", "dwi"):
        assert availability[sequence_index(name)] == 0.0
        assert np.all(images[sequence_index(name)] == MISSING_CHANNEL_FILL_VALUE)


def test_left_right_flip_moves_image_and_target_together(records: list[CaseRecord]) -> None:
    rec = next(r for r in records if r.target.any())
    settings = dataclasses.replace(NO_AUGMENT, flip_lr_probability=1.0)
    images, _, target = augment_case(
        rec.images, rec.availability, rec.target, rec.geometry, settings, np.random.default_rng(0)
    )
    axis = lr_array_axis(rec.geometry)
    assert np.array_equal(target, np.flip(rec.target, axis=axis))
    assert np.array_equal(images, np.flip(rec.images, axis=axis + 1))
    assert not np.array_equal(target, rec.target)


def test_dataset_item_flips_the_lesion_index_with_the_target(records: list[CaseRecord]) -> None:
    rec = next(r for r in records if r.target.any())
    flip = CaseDataset([rec], augment=dataclasses.replace(NO_AUGMENT, flip_lr_probability=1.0))[0]
    axis = lr_array_axis(rec.geometry)
    assert np.array_equal(flip["lesion_index"].numpy(), np.flip(rec.lesion_index, axis=axis))
    significant = [i + 1 for i, les in enumerate(rec.truth["lesions"]) if les["significant"]]
    assert np.array_equal(flip["target"][0].numpy() > 0, np.isin(flip["lesion_index"].numpy(), significant))


def test_per_lesion_mean_weighs_every_lesion_the_same_whatever_its_volume() -> None:
    values = torch.zeros(2, 4, 8, 8)
    lesion_index = torch.zeros(2, 4, 8, 8, dtype=torch.int64)
    lesion_index[0, :, :6, :6] = 1  # 144 voxels, loss 1 each
    values[0, :, :6, :6] = 1.0
    lesion_index[0, 0, 7, 7] = 2  # one voxel, loss 3
    values[0, 0, 7, 7] = 3.0
    lesion_index[1, 1, 0, :2] = 1  # study 2's lesion 1 is another lesion: two voxels, loss 5
    values[1, 1, 0, :2] = 5.0
    got = per_lesion_mean(values, lesion_index, lesion_index > 0)
    assert float(got) == pytest.approx((1.0 + 3.0 + 5.0) / 3)  # a pooled voxel mean would be about 1.1


def test_cache_built_by_two_processes_equals_the_serial_cache(records: list[CaseRecord], tmp_path: Path) -> None:
    paths = build_cache(tmp_path, DATA_SEED, range(2), progress=False, workers=2)
    for i, path in enumerate(paths):
        parallel = load_case(path)
        assert np.array_equal(parallel.images, records[i].images)
        assert np.array_equal(parallel.lesion_index, records[i].lesion_index)
        assert parallel.truth == records[i].truth


def test_cached_cases_load_the_same_in_threads_and_in_order(cache_dir: Path, records: list[CaseRecord]) -> None:
    from training.data import load_cases

    loaded = load_cases([case_cache_path(cache_dir, DATA_SEED, i) for i in range(6)], workers=3)
    assert [r.case_id for r in loaded] == [r.case_id for r in records]
    assert all(np.array_equal(a.images, b.images) for a, b in zip(loaded, records, strict=True))


def test_loader_workers_give_the_same_augmented_batches_as_the_training_process(
    records: list[CaseRecord], tmp_path: Path
) -> None:
    """Augmentation is seeded per (seed, epoch, case), so reading batches in worker processes (the GPU recipe's
    ``--loader-workers``) changes nothing but the speed."""
    dataset = CaseDataset(records[:4], augment=AugmentSettings(), seed=3)
    dataset.set_epoch(2)
    inline = list(_batches(dataset, _config(tmp_path, tmp_path / "run"), global_epoch=2))
    workers = list(_batches(dataset, _config(tmp_path, tmp_path / "run", loader_workers=2), global_epoch=2))
    assert len(inline) == len(workers) == 2
    for a, b in zip(inline, workers, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)


def _gradients(nets: MpmriNetworks, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in nets.parameters():
        p.grad = None
    loss.backward()
    return {
        f"{name}.{key}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, module in nets.modules().items()
        for key, p in module.named_parameters()
    }


def test_lesion_balanced_recall_weighs_each_cspca_lesion_the_same_and_skips_absent_sequences(
    records: list[CaseRecord],
) -> None:
    """The per-lesion recall term: a one-voxel lesion weighs as much as a 36-voxel one, an absent sequence's map
    does not count, the shell term is a per-lesion mean too, a batch without csPCa gives 0 (with a graph), and the
    option adds exactly this term."""
    logits = torch.full((2, NUM_SEQUENCES, 2, 8, 8), 5.0)
    target = torch.zeros(2, 1, 2, 8, 8)
    lesion_index = torch.zeros(2, 2, 8, 8, dtype=torch.int64)
    target[0, 0, 0, :6, :6] = 1.0  # a large lesion the maps answer (logit 5: loss log(1 + e^-5))
    lesion_index[0, 0, :6, :6] = 1
    target[1, 0, 1, 7, 7] = 1.0  # a one-voxel lesion that every present map misses (logit -5)
    lesion_index[1, 1, 7, 7] = 2
    logits[1, :, 1, 7, 7] = -5.0
    availability = torch.ones(2, NUM_SEQUENCES)
    availability[1, 0] = 0.0
    logits[1, 0, 1, 7, 7] = 50.0  # an absent sequence's answer is ignored
    got = lesion_balanced_recall(logits, target, availability, lesion_index)
    small, large = torch.nn.functional.softplus(torch.tensor(5.0)), torch.nn.functional.softplus(torch.tensor(-5.0))
    assert float(got) == pytest.approx(float((small + large) / 2), rel=1e-5)  # a voxel mean would be about 0.14
    # with a one-voxel shell each lesion also answers for its neighbours, which every present map calls (logit 5)
    shelled = lesion_balanced_recall(logits, target, availability, lesion_index, shell_voxels=1)
    assert float(shelled) == pytest.approx(float((small + large) / 2 + small), rel=1e-5)
    none = lesion_balanced_recall(logits.requires_grad_(), torch.zeros_like(target), availability, lesion_index)
    assert float(none.detach()) == 0.0 and none.requires_grad
    torch.manual_seed(0)
    nets = build_networks("cpu")
    batch = next(iter(torch.utils.data.DataLoader(CaseDataset(records[:2]), batch_size=2)))
    assert bool(batch["target"].any())
    with torch.no_grad():
        plain = _forward(nets, batch, "localization", LocalizationLoss(), fused_loss_trains_localization=False)
        balanced = _forward(
            nets, batch, "localization", LocalizationLoss(lesion_balanced=True), fused_loss_trains_localization=False
        )
        term = lesion_balanced_recall(
            nets.localization.forward_logits(batch["images"]),
            batch["target"],
            batch["availability"],
            batch["lesion_index"],
        )
    assert float(term) > 0
    assert float(balanced) == pytest.approx(float(plain) + float(term), rel=1e-5)


def test_with_fusion_only_the_fused_map_loss_trains_the_fusion_and_each_map_learns_from_its_own_sequence(
    records: list[CaseRecord],
) -> None:
    """``fused_loss_trains_localization=False``: the localization's gradients are exactly those of the per-sequence
    loss (the fused-map terms reach the fusion only), while the fusion still learns; the default trains both."""
    torch.manual_seed(0)
    nets = build_networks("cpu")
    with torch.no_grad():  # a gate that is not zero, so that the fusion's weights depend on the maps
        for p in nets.fusion.gate.parameters():
            p.normal_(0.0, 0.1)
    batch = next(iter(torch.utils.data.DataLoader(CaseDataset(records[:2]), batch_size=2)))
    loc_loss = LocalizationLoss()
    detached = _gradients(nets, _forward(nets, batch, "localization", loc_loss, fused_loss_trains_localization=False))
    attached = _gradients(nets, _forward(nets, batch, "localization", loc_loss, fused_loss_trains_localization=True))
    present = batch["availability"] > 0.5
    logits = nets.localization.forward_logits(batch["images"])
    own = _gradients(
        nets,
        loc_loss.per_sequence(logits[present].unsqueeze(1), batch["target"].expand_as(logits)[present].unsqueeze(1)),
    )
    localization = [k for k in own if k.startswith("localization.")]
    fusion = [k for k in own if k.startswith("map_fusion.")]
    assert all(torch.allclose(detached[k], own[k], atol=1e-7) for k in localization)
    assert not all(torch.allclose(attached[k], own[k], atol=1e-7) for k in localization)
    assert all(float(detached[k].abs().sum()) > 0 for k in fusion)
    assert all(torch.allclose(detached[k], attached[k]) for k in fusion)


def test_map_dropout_zeroes_whole_studies_maps_and_the_classification_loss_then_reads_the_images_alone(
    records: list[CaseRecord], tmp_path: Path
) -> None:
    """``--map-dropout``: each study's fused map reaches the classification network either untouched or all zero;
    0 changes nothing, and with 1 the classification phase's loss is that of an all-zero map; a value that is no
    probability is refused before any data work."""
    fused = torch.rand(64, 1, 2, 3, 3) + 0.1
    assert drop_fused_map(fused, 0.0) is fused
    assert not drop_fused_map(fused, 1.0).any()
    torch.manual_seed(0)
    half = drop_fused_map(fused, 0.5)
    dropped = (half == 0).flatten(1).all(dim=1)
    kept = (half == fused).flatten(1).all(dim=1)
    assert bool((dropped ^ kept).all()) and 10 < int(dropped.sum()) < 54
    torch.manual_seed(0)
    nets = build_networks("cpu").eval()  # no dropout inside the networks: the two losses are comparable
    batch = next(iter(torch.utils.data.DataLoader(CaseDataset(records[:2]), batch_size=2)))
    with torch.no_grad():
        loss = _forward(nets, batch, "classification", LocalizationLoss(), map_dropout=1.0)
        zero_map = torch.zeros_like(batch["images"][:, :1])
        expected = score_loss(nets.classification, nets.classification.score(batch["images"], zero_map), batch)
        with_map = _forward(nets, batch, "classification", LocalizationLoss(), map_dropout=0.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(with_map) != pytest.approx(float(expected), rel=1e-6)
    for bad in (-0.1, 1.5):
        with pytest.raises(TrainingError, match="map_dropout is a probability"):
            train(_config(tmp_path / "cache", tmp_path / "run", map_dropout=bad), progress=False)
    assert not (tmp_path / "cache").exists()


def test_an_unavailable_training_device_is_refused_before_any_data_work(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="only cpu and cuda"):
        train(_config(tmp_path / "cache", tmp_path / "run", device="meta"), progress=False)
    with pytest.raises(TrainingError, match="unknown training device 'gpu0'"):
        train(_config(tmp_path / "cache", tmp_path / "run", device="gpu0"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="torch sees no CUDA device"):
            train(_config(tmp_path / "cache", tmp_path / "run", device="cuda"), progress=False)
    assert not (tmp_path / "cache").exists()


def test_training_cli_runs_alone_and_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m training.cli`` (the GPU machine's entry point: no serving stack there) parses the same options."""
    from training.cli import main as training_main

    rc = training_main(["train", "--device", "meta", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "meta" in err and "\n" not in err


def test_baseline_maps_are_bounded_and_dwi_rule_peaks_in_a_significant_lesion(records: list[CaseRecord]) -> None:
    for rec in records:
        for rule in BASELINES:
            likelihood = baseline_likelihood_map(rec.images, rec.availability, rule)
            assert likelihood.shape == rec.target.shape
            assert likelihood.min() >= 0.0 and likelihood.max() <= 1.0
            assert not likelihood[~central_ellipsoid_mask(likelihood.shape)].any()
    rec = next(r for r in records if r.target.any())
    dwi = baseline_likelihood_map(rec.images, rec.availability, "dwi_max")
    assert dwi[rec.target > 0].max() > np.percentile(dwi[dwi > 0], 90)


@pytest.mark.slow
def test_smoke_training_loss_falls(cache_dir: Path, tmp_path: Path) -> None:
    config = _config(
        cache_dir,
        tmp_path / "run",
        epochs={"localization": 8, "classification": 0, "joint": 0},
        augment=NO_AUGMENT,
        lr=3e-3,
    )
    final = train(config, progress=False)
    with open(tmp_path / "run" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    losses = [float(r["train_loss"]) for r in rows]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    nets, meta = load_checkpoint(final)
    assert meta["training"]["data"]["data_seed"] == DATA_SEED
    assert meta["training"]["data"]["train_cases"] == 4


def test_training_report_writes_the_run_and_a_named_reproduction_into_their_own_sections(
    cache_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    epochs = {"localization": 1, "classification": 1, "joint": 0}
    train(_config(cache_dir, tmp_path / "run", epochs=epochs, fused_loss_trains_localization=False))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "training_report.py"
    for extra in ([], ["--section", "reproduction", "--label", "from an empty cache"], []):
        cmd = [sys.executable, str(script), "--run", str(tmp_path / "run"), "--write", str(md), *extra]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    text = md.read_text()
    assert text.count("<!-- training:begin -->") == 1 and text.count("<!-- training-reproduction:begin -->") == 1
    assert "— from an empty cache" in text and "--epochs-localization 1" in text
    assert "--fused-loss-trains-fusion-only" in text  # the recorded command reproduces the run's loss setting
    assert "synthetic studies only" in text
    # where the tensors were preprocessed: the CPU and the kernels' target (a compiler bug was CPU-specific)
    assert "; CPU " in text and "preprocessing kernels compiled for " in text


def test_training_report_names_the_scorers_models_and_recalibration_and_the_recipe_flag() -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "training_report.py"
    spec = importlib.util.spec_from_file_location("training_report", script)
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    record = {
        "category5": {"candidates": 1159, "positives": 374},
        "lesion": {"candidates": 20, "skipped": "too few"},
        "recalibration": {"data": "seed 1 cases 1900-3499", "studies": 1600, "slope": 1.17337, "intercept": 0.072},
    }
    words = report.scorer_model_words(record)
    assert "ordinal models (category 5 against 4)" in words
    assert "any lesion" not in words  # skipped: not claimed
    assert "recalibrated on seed 1 cases 1900-3499 (study-level Platt, slope 1.173, intercept 0.072)" in words
    flags = report._calibration_flag({"calibration_cases": 300, "scorer_cases": 800, "recalibration_cases": 1600})
    assert flags == " --calibration-cases 300 --scorer-cases 800 --recalibration-cases 1600"


def test_scorer_only_and_recalibration_only_cases_follow_the_calibration_only_ones_and_nothing_trains_on_them(
    cache_dir: Path, tmp_path: Path
) -> None:
    from training.train import _scorer_data

    config = _config(cache_dir, tmp_path / "run", calibration_cases=1, scorer_cases=2, recalibration_cases=1)
    splits = load_records(config, progress=False)
    assert [r.case_id for r in splits.calibration] == [f"seed{DATA_SEED}_0006"]
    assert [r.case_id for r in splits.scorer] == [f"seed{DATA_SEED}_0007", f"seed{DATA_SEED}_0008"]
    assert [r.case_id for r in splits.recalibration] == [f"seed{DATA_SEED}_0009"]  # seen by nothing else
    assert len(splits.training) == 4 and len(splits.validation) == 2
    assert _scorer_data(config, len(splits.training)).startswith(f"seed {DATA_SEED} cases 4-8 ")
    with pytest.raises(TrainingError, match="scorer_cases must be >= 0"):
        load_records(dataclasses.replace(config, scorer_cases=-1), progress=False)
    with pytest.raises(TrainingError, match="recalibration_cases must be >= 0"):
        load_records(dataclasses.replace(config, recalibration_cases=-1), progress=False)
    with pytest.raises(TrainingError, match="recalibrate the lesion scorer: they need scorer_cases"):
        load_records(dataclasses.replace(config, scorer_cases=None), progress=False)


def test_calibration_only_cases_are_calibrated_on_but_never_trained_on_or_validated(
    cache_dir: Path, tmp_path: Path
) -> None:
    config = _config(
        cache_dir,
        tmp_path / "run",
        calibration_cases=2,
        epochs={"localization": 1, "classification": 0, "joint": 0},
        max_steps_per_epoch=1,
    )
    train_records, val_records, calibration_records, scorer_records, _ = load_records(config, progress=False)
    # cases 6 and 7 of the seed: after the training and validation cases
    assert [r.case_id for r in calibration_records] == [f"seed{DATA_SEED}_0006", f"seed{DATA_SEED}_0007"]
    assert len(train_records) == 4 and len(val_records) == 2 and scorer_records == []
    _, meta = load_checkpoint(train(config, progress=False))
    data = meta["training"]["data"]
    assert (data["train_cases"], data["val_cases"], data["calibration_cases"]) == (4, 2, 2)
    assert data["case_indices"] == [0, 7]
    # the calibration saw the 2 validation + 2 calibration-only studies (too few: it says so and stays the identity)
    assert meta["calibration"]["skipped"].startswith("4 calibration cases")
    assert "calibration-only: seed 1234 cases 6-7" in meta["calibration"]["data"]


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(cache_dir: Path, tmp_path: Path) -> None:
    full = train(_config(cache_dir, tmp_path / "full"), progress=False)
    stopped = train(_config(cache_dir, tmp_path / "resumed", stop_after_epochs=2), progress=False)
    state = load_training_state(stopped)
    assert state is not None and state["next_global_epoch"] == 2  # stopped between phases 1 and 2
    resumed = train(_config(cache_dir, tmp_path / "resumed"), resume=stopped, progress=False)
    nets_full, _ = load_checkpoint(full)
    nets_resumed, meta = load_checkpoint(resumed)
    assert meta["training"]["epochs_done"] == 4
    for name, module in nets_full.modules().items():
        other = nets_resumed.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.allclose(value, other[key], atol=1e-5), f"{name}.{key}"


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_and_plots(cache_dir: Path, synthetic_dataset: list[Path], tmp_path: Path) -> None:
    checkpoint = train(_config(cache_dir, tmp_path / "run"), progress=False)
    data_dir = synthetic_dataset[0].parent
    out = tmp_path / "eval"
    rc = mpmri_main(["evaluate", "--data", str(data_dir), "--out", str(out), "--checkpoint", str(checkpoint)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("auroc", "ap", "score", "baseline_auroc", "baseline_ap", "baseline_score", "pirads_confusion"):
        assert key in metrics
    assert metrics["num_cases"] == len(synthetic_dataset)
    for value in (metrics["ap"], metrics["baseline_ap"]):
        assert value is None or 0.0 <= value <= 1.0
    assert sum(map(sum, metrics["pirads_confusion"]["rows_truth_cols_predicted"])) == len(synthetic_dataset)
    for png in ("roc.png", "pr.png", "froc.png", "confusion.png"):
        assert (out / png).stat().st_size > 0


def test_evaluate_protocol_outputs_on_the_shipped_checkpoint(
    synthetic_dataset: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = synthetic_dataset[0].parent
    out = tmp_path / "eval"
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n")
    rc = mpmri_main(
        ["evaluate", "--data", str(data_dir), "--out", str(out), "--resamples", "40", "--no-progress"]
        + ["--benchmarks-md", str(bench)]
    )
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    figures = ("auroc", "ap", "brier", "ece", "pirads_quadratic_kappa", "located_fraction", "incoherent_fraction")
    for key in (*figures, "froc_sensitivity_at_0.5_fp", "froc_sensitivity_at_1_fp", "baseline_dwi_auroc"):
        assert key in metrics and key in metrics["ci95"], key
    assert metrics["data_seeds"] == [1234] and metrics["bootstrap"]["resamples"] == 40
    with open(out / "cases.csv") as fh:
        cases = list(csv.DictReader(fh))
    with open(out / "candidates.csv") as fh:
        candidates = list(csv.DictReader(fh))
    with open(out / "lesions.csv") as fh:
        lesions = list(csv.DictReader(fh))
    needed = {
        "case_id",
        "significant",
        "max_pirads",
        "cspca_probability",
        "pirads_predicted",
        "top_candidate_likelihood",
    }
    assert needed <= set(cases[0])
    assert {"case_id", "x_mm", "y_mm", "z_mm", "likelihood", "pirads"} <= set(candidates[0])
    assert all(1 <= int(c["pirads"]) <= 5 for c in candidates)  # every candidate carries its own category
    # the study category is at least every lesion's, and the study probability at least every lesion's likelihood
    for case in cases:
        mine = [c for c in candidates if c["case_id"] == case["case_id"]]
        assert int(case["pirads_predicted"]) >= max((int(c["pirads"]) for c in mine), default=1)
        assert float(case["cspca_probability"]) >= max((float(c["likelihood"]) for c in mine), default=0) - 1e-3
    assert set(metrics["ablation"]) == {"without_t2w", "without_adc", "without_dwi", "t2w_only", "t2w_adc"}
    assert metrics["ablation"]["t2w_only"]["sequences"] == ["t2w"]
    weights = metrics["fusion_weights"]["all_voxels"]
    assert weights["t2w"] + weights["adc"] + weights["dwi"] == pytest.approx(1.0, abs=1e-4)
    for group in metrics["lesion_map_response"].values():  # a fused peak >= 0.5 is above the candidate floor
        assert group["lesions"] > 0 and group["fused_reaches_floor"] >= group["fused"]
    assert metrics["calibration"]["slope"] > 0
    assert len(cases) == len(synthetic_dataset)
    assert len(candidates) == sum(int(c["num_candidates"]) for c in cases)
    # located is over every significant lesion of the truth, each a row of lesions.csv
    truth = [json.loads((d / "ground_truth.json").read_text()) for d in synthetic_dataset]
    assert len(lesions) == metrics["lesions_total"] == sum(les["significant"] for t in truth for les in t["lesions"])
    located = [int(row["located"]) for row in lesions]
    assert metrics["lesions_located"] == sum(located)
    assert all(float(row["nearest_candidate_mm"] or "inf") <= 5.0 for row in lesions if row["located"] == "1")
    if lesions:
        assert metrics["located_fraction"] == pytest.approx(sum(located) / len(located))
    assert set(metrics["by_size"]) == {"<10 mm", "10-15 mm", ">=15 mm"}
    assert set(metrics["by_zone"]) == {row["zone"] for row in lesions}
    text = bench.read_text()
    assert "<!-- evaluation:begin -->" in text and "seed 1234" in text


def test_evaluate_cli_reports_missing_data_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = mpmri_main(["evaluate", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "absent" in err and "\n" not in err


@pytest.mark.slow
def test_gpu_profile_recipe_trains_at_the_realistic_grid_and_the_grid_travels_to_the_model_repository(
    tmp_path: Path, synthetic_dataset: list[Path]
) -> None:
    """The GPU profile's recipe at tiny scale on the CPU: preprocessing onto REALISTIC_GRID, three phases, a
    checkpoint recording that grid, evaluation preprocessing onto that grid, and the repository configs made for it,
    whose served contract carries it (the ONNX export itself is the same code for every grid:
    tests/test_service_contract.py serves another grid)."""
    from contract import REALISTIC_GRID, tensor_specs
    from export.repository import served_contract, write_configs

    config = _config(
        tmp_path / "cache",
        tmp_path / "run",
        profile="gpu",
        grid="realistic",
        cases=2,
        val_cases=1,
        batch_size=1,
        max_steps_per_epoch=1,
        epochs={"localization": 1, "classification": 1, "joint": 1},
    )
    final = train(config, progress=False)
    nets, meta = load_checkpoint(final)
    assert nets.grid == REALISTIC_GRID and nets.profile.name == "gpu"
    assert meta["contract"]["grid"] == REALISTIC_GRID.to_dict()
    assert "skipped" in meta["calibration"]  # one validation case: the calibration stays the identity, said so
    cached = load_case(next((tmp_path / "cache").rglob("case_0000.npz")))
    assert cached.images.shape[1:] == REALISTIC_GRID.size_dhw
    from training.evaluate import evaluate

    data = tmp_path / "data"  # one `mpmri synth` study: evaluation must read the grid from the checkpoint
    data.mkdir()
    (data / synthetic_dataset[0].name).symlink_to(synthetic_dataset[0], target_is_directory=True)
    metrics = evaluate(data, tmp_path / "eval", checkpoint=final, progress=False, resamples=10, ablations=False)
    assert metrics["num_cases"] == 1
    repository = tmp_path / "model_repository"  # the configs `mpmri export` writes for this checkpoint's grid
    write_configs(repository, nets.grid)
    assert served_contract(repository).grid == REALISTIC_GRID
    assert tensor_specs(REALISTIC_GRID)["cspca_map"].shape == (1, *REALISTIC_GRID.size_dhw)
