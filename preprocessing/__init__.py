"""Preprocessing: the only path from an mpMRI DICOM study to the normalized model tensor.

Public API: :func:`preprocess_study`, :class:`PreprocessSettings`, :class:`PreprocessedStudy`
(``preprocessing.pipeline``) and :func:`preprocessing.grid.resample_label_to_grid`.
Later this package also hosts the gRPC preprocessing service that calls the Triton ensemble.
"""

#: Version of what the pipeline computes (not of the contract, which it implements): "2" = the compiled linear
#: resampler (float32 rounding of SimpleITK's values; edge values, not 0, on grid voxels lying exactly on a face
#: of the source's voxel box). Training caches are keyed by it, so a model never trains on another version's
#: tensors than it is served with. "3": the same definition; version 2 caches built on AMD Zen 4/5 hosts hold
#: tensors from miscompiled kernels (``preprocessing.numba_target``), so no version 2 cache is read again.
PREPROCESSING_VERSION = "3"

from preprocessing import numba_target  # noqa: E402

# numba fixes its CPU target at the first decorated function of the process, and every kernel module of this
# package is imported after this line: the kernels are compiled for the host's x86-64 ISA level, not its CPU
# model (LLVM miscompiled them for AMD Zen 4/5 models; preprocessing.numba_target)
numba_target.configure()

from preprocessing.pipeline import PreprocessedStudy, PreprocessSettings, preprocess_study  # noqa: E402

__all__ = ["PREPROCESSING_VERSION", "PreprocessSettings", "PreprocessedStudy", "preprocess_study"]
