"""Preprocessing: the only path from an mpMRI DICOM study to the normalized model tensor.

Public API: :func:`preprocess_study`, :class:`PreprocessSettings`, :class:`PreprocessedStudy`
(``preprocessing.pipeline``) and :func:`preprocessing.grid.resample_label_to_grid`.
Later this package also hosts the gRPC preprocessing service that calls the Triton ensemble.
"""

from preprocessing.pipeline import PreprocessedStudy, PreprocessSettings, preprocess_study

__all__ = ["PreprocessSettings", "PreprocessedStudy", "preprocess_study"]
