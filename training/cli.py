"""``mpmri train`` and ``mpmri evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from networks.checkpoint import DEFAULT_CHECKPOINT
from training.report import ROLES


def register(subparsers: Any) -> None:
    defaults = _train_defaults()
    p = subparsers.add_parser(
        "train",
        help="two-phase training on synthetic studies (localization, then classification + joint fine-tuning)",
        description="Train the three networks on synthetic studies run through the serving preprocessing.",
    )
    p.add_argument("--profile", default=defaults.profile, help="network profile: cpu (default) or gpu")
    p.add_argument(
        "--grid",
        default=defaults.grid,
        choices=["default", "realistic"],
        help="model grid: default (16x64x64 @ 3x1.5x1.5 mm) or realistic (24x256x256 @ 3x0.5x0.5 mm, GPU profile)",
    )
    p.add_argument(
        "--localization-weights",
        choices=("shared", "per_sequence"),
        default=None,
        help="override the profile's localization weights (ablation)",
    )
    p.add_argument("--cases", type=int, default=defaults.cases, help="synthetic cases in total (train + validation)")
    p.add_argument("--val-cases", type=int, default=defaults.val_cases, help="cases held out for per-epoch validation")
    p.add_argument(
        "--calibration-cases",
        type=int,
        default=defaults.calibration_cases,
        help="further cases (after --cases) used only to calibrate, with the validation split (default 0)",
    )
    p.add_argument(
        "--scorer-cases",
        type=int,
        default=defaults.scorer_cases,
        help="fit the second-stage lesion scorer on the validation, calibration-only and this many further cases "
        "(after the calibration-only ones); default: no lesion scorer",
    )
    p.add_argument(
        "--recalibration-cases",
        type=int,
        default=defaults.recalibration_cases,
        help="with --scorer-cases: recalibrate the lesion scorer (study-level Platt) on this many further cases "
        "(after the scorer-only ones) that nothing else sees (default 0: none)",
    )
    p.add_argument("--data-seed", type=int, default=defaults.data_seed, help="synthetic data seed")
    p.add_argument("--cache", type=Path, default=defaults.cache_dir, help="npz cache of preprocessed cases")
    p.add_argument("--out", type=Path, default=defaults.run_dir, help="run folder (history.csv, curves.png, *.pt)")
    p.add_argument("--checkpoint-out", type=Path, default=None, help="also write the final checkpoint here")
    p.add_argument("--epochs-localization", type=int, default=defaults.epochs["localization"])
    p.add_argument("--epochs-classification", type=int, default=defaults.epochs["classification"])
    p.add_argument("--epochs-joint", type=int, default=defaults.epochs["joint"])
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate, phases 1-2")
    p.add_argument("--lr-joint", type=float, default=defaults.lr_joint, help="peak learning rate, joint phase")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialisation and augmentation")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument(
        "--device", default=defaults.device, help="where to train: cpu (default, the shipped recipe) or cuda"
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=defaults.loader_workers,
        help="processes that read and augment batches (default 0: in the training process)",
    )
    p.add_argument(
        "--fused-loss-trains-fusion-only",
        action="store_true",
        help="the fused-map loss terms train the fusion only, not the localization (sequence maps detached there)",
    )
    p.add_argument(
        "--map-dropout",
        type=float,
        default=defaults.map_dropout,
        help="probability that a training study's fused map reaches the classification network as zeros (default 0)",
    )
    p.add_argument(
        "--lesion-balanced-localization",
        action="store_true",
        help="add a per-lesion recall term to the localization loss (each csPCa lesion weighs the same)",
    )
    p.add_argument(
        "--lesion-shell-voxels",
        type=int,
        default=defaults.lesion_shell_voxels,
        help="with --lesion-balanced-localization: also a per-lesion term against 0 in a shell this wide (default 0)",
    )
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="stop early (continue later with --resume)")
    p.add_argument("--resume", type=Path, default=None, help="continue from a run's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    e = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on `mpmri synth` studies (full chain from DICOM, picai_eval)",
        description="Run preprocessing -> networks -> candidates on every case of DIR and score it.",
    )
    e.add_argument("--data", type=Path, required=True, help="folder made by `mpmri synth`")
    e.add_argument("--out", type=Path, required=True, help="report folder (metrics.json, plots)")
    e.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--record", action="store_true", help="store the metrics in the checkpoint's metadata")
    e.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    e.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the case-level bootstrap")
    e.add_argument(
        "--benchmarks-md",
        type=Path,
        default=None,
        help="also write the results as the marked evaluation section of this file (e.g. BENCHMARKS.md); "
        "only for validation seeds (docs/networks.md, 'Seeds')",
    )
    e.add_argument("--no-ablation", action="store_true", help="skip the sequence ablation (5 more network passes)")
    e.add_argument(
        "--role",
        choices=list(ROLES),
        default="validation",
        help="which BENCHMARKS.md section --benchmarks-md writes: validation (default), test (the released "
        "checkpoint's one run on its test seed) or candidate (a checkpoint not shipped, on a validation seed)",
    )
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_run_evaluate)

    f = subparsers.add_parser(
        "fit-lesion-scorer",
        help="fit the second-stage lesion scorer of a checkpoint on studies its networks never trained on",
        description="Run the checkpoint's chain on synthetic studies FIRST..LAST of --data-seed, fit the lesion "
        "scorer (csPCa likelihood, category 5 against 4, any lesion) on their candidates and write the checkpoint "
        "with it (weights unchanged; a recalibration is not kept: run recalibrate-lesion-scorer after).",
    )
    _checkpoint_scorer_arguments(f, defaults, "700-1899")
    f.set_defaults(func=_run_fit_scorer)

    r = subparsers.add_parser(
        "recalibrate-lesion-scorer",
        help="fold a study-level Platt map, fitted on studies nothing else saw, into a checkpoint's lesion scorer",
        description="Run the checkpoint's chain (networks + lesion scorer) on synthetic studies FIRST..LAST of "
        "--data-seed, which neither its networks nor its scorer have seen; fit the study-level Platt map of the "
        "highest candidate log-odds and write the checkpoint with that map folded into the scorer (weights unchanged).",
    )
    _checkpoint_scorer_arguments(r, defaults, "1900-3499")
    r.set_defaults(func=_run_recalibrate_scorer)


def _checkpoint_scorer_arguments(parser: Any, defaults: Any, example_cases: str) -> None:
    """The arguments of the commands that rewrite a checkpoint's lesion scorer (:func:`_run_on_checkpoint`)."""
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (may be --checkpoint itself)")
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed, help="synthetic data seed")
    parser.add_argument("--cases", required=True, help=f"FIRST-LAST case indices (inclusive), e.g. {example_cases}")
    parser.add_argument("--cache", type=Path, default=defaults.cache_dir, help="npz cache of preprocessed cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")


def _train_defaults() -> Any:
    from training.train import TrainConfig

    return TrainConfig()


def _run_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    config = TrainConfig(
        profile=args.profile,
        grid=args.grid,
        localization_weights=args.localization_weights,
        data_seed=args.data_seed,
        cases=args.cases,
        val_cases=args.val_cases,
        calibration_cases=args.calibration_cases,
        scorer_cases=args.scorer_cases,
        recalibration_cases=args.recalibration_cases,
        cache_dir=args.cache,
        run_dir=args.out,
        checkpoint_out=args.checkpoint_out,
        epochs={
            "localization": args.epochs_localization,
            "classification": args.epochs_classification,
            "joint": args.epochs_joint,
        },
        batch_size=args.batch_size,
        lr=args.lr,
        lr_joint=args.lr_joint,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        loader_workers=args.loader_workers,
        fused_loss_trains_localization=not args.fused_loss_trains_fusion_only,
        map_dropout=args.map_dropout,
        lesion_balanced_localization=args.lesion_balanced_localization,
        lesion_shell_voxels=args.lesion_shell_voxels,
        max_steps_per_epoch=args.max_steps_per_epoch,
        stop_after_epochs=args.stop_after_epochs,
    )
    final = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {final}")
    if args.checkpoint_out is not None and final.name == "final.pt":
        print(f"checkpoint: {args.checkpoint_out}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    metrics = evaluate(
        args.data,
        args.out,
        checkpoint=args.checkpoint,
        threads=args.threads,
        progress=not args.no_progress,
        record_in_checkpoint=args.record,
        resamples=args.resamples,
        bootstrap_seed=args.bootstrap_seed,
        ablations=not args.no_ablation,
    )
    keys = (
        "auroc",
        "ap",
        "classifier_auroc",
        "brier",
        "ece",
        "baseline_dwi_auroc",
        "located_fraction",
        "froc_sensitivity_at_1_fp",
        "incoherent_fraction",
        "pirads_quadratic_kappa",
        "num_cases",
    )
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    print("(synthetic studies; 95% intervals in metrics.json 'ci95')")
    print(f"report: {args.out}")
    if args.benchmarks_md is not None:
        from training.report import write_benchmarks_section

        command = (
            f"mpmri evaluate --data {args.data} --out {args.out} --checkpoint {args.checkpoint} "
            f"--resamples {args.resamples} --bootstrap-seed {args.bootstrap_seed} --benchmarks-md {args.benchmarks_md}"
            f" --role {args.role}{' --no-ablation' if args.no_ablation else ''}"
        )
        write_benchmarks_section(args.benchmarks_md, metrics, command, role=args.role)
        print(f"benchmarks: {args.benchmarks_md} ({args.role} section)")
    return 0


def _case_range(text: str) -> range:
    from training.lesion_scoring import LesionScoringError

    first, sep, last = text.partition("-")
    try:
        start, stop = int(first), int(last) + 1
    except ValueError:
        raise LesionScoringError(f"--cases must be FIRST-LAST (e.g. 700-1899), not {text!r}") from None
    if not sep or start < 0 or stop <= start:
        raise LesionScoringError(f"--cases must be FIRST-LAST with 0 <= FIRST <= LAST, not {text!r}")
    return range(start, stop)


def _run_fit_scorer(args: argparse.Namespace) -> int:
    from training.lesion_scoring import fit_checkpoint_scorer

    scorer = _run_on_checkpoint(fit_checkpoint_scorer, args)
    print(json.dumps(scorer.fitted_on, indent=2))
    print(f"checkpoint: {args.out}")
    return 0


def _run_recalibrate_scorer(args: argparse.Namespace) -> int:
    from training.lesion_scoring import recalibrate_checkpoint_scorer

    scorer = _run_on_checkpoint(recalibrate_checkpoint_scorer, args)
    print(json.dumps(scorer.recalibration, indent=2))
    print(f"checkpoint: {args.out}")
    return 0


def _run_on_checkpoint(command: Any, args: argparse.Namespace) -> Any:
    """``command(checkpoint, out, data_seed, cases, cache, threads=, progress=)`` from the parsed arguments."""
    return command(
        args.checkpoint,
        args.out,
        args.data_seed,
        _case_range(args.cases),
        args.cache,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli train|evaluate ...``: these two commands alone, for a machine that has only the
    training dependencies (a GPU machine without the serving stack: no tritonclient, no grpc stubs)."""
    import logging
    import sys

    from contract.errors import MpmriError

    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except MpmriError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
