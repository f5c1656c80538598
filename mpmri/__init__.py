"""mpmri-serve: prostate mpMRI lesion localization and classification, served by Triton."""

__version__ = "0.1.0"
