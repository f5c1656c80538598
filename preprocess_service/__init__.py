"""Preprocessing: the only path from an mpMRI DICOM study to the normalized model tensor.

Later this package also hosts the gRPC preprocessing service that calls the Triton ensemble.
"""
