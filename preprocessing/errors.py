"""Typed, user-facing preprocessing errors (each ``str(err)`` is one line naming the problem)."""

from __future__ import annotations

from contract.errors import MpmriError


class PreprocessError(MpmriError):
    """Base class of every expected preprocessing failure."""


class NotDicomError(PreprocessError):
    """The input contains no readable DICOM object."""


class CorruptDicomError(PreprocessError):
    """A DICOM file is damaged: a header element that cannot be read (unknown VR, a number that does not
    parse, a required element missing), or a file that starts like DICOM but cannot be read at all."""


class TruncatedDicomError(CorruptDicomError):
    """A DICOM file ends early (header or pixel data shorter than declared)."""


class TooManyInstancesError(PreprocessError):
    """More instances than :attr:`PreprocessSettings.max_instances` (protects the service)."""


class MultipleStudiesError(PreprocessError):
    """The input holds more than one StudyInstanceUID and none was selected."""


class NotMRError(PreprocessError):
    """No MR image is present (e.g. a CT-only input)."""


class NoT2WError(PreprocessError):
    """No series could be identified as T2-weighted; T2W is required (it defines the model grid)."""


class InconsistentGeometryError(PreprocessError):
    """A chosen series has mixed orientations, duplicate or missing slices, or non-uniform spacing."""


class DuplicateSliceError(InconsistentGeometryError):
    """Several instances of a series at one slice position and nothing (acquisition/content time,
    InstanceNumber) tells which one is the later acquisition."""


class ConflictingInstancesError(PreprocessError):
    """Two objects share a SOPInstanceUID but differ in content (a resent copy must be identical)."""


class SingleSliceSeriesError(PreprocessError):
    """A chosen series has a single slice, so no 3D volume can be built."""


class UnsupportedPixelDataError(PreprocessError):
    """Pixel data of a chosen series cannot be decoded (missing codec, colour data, ...)."""


class RulesFileError(PreprocessError):
    """The series rules file is missing, not JSON, or does not follow the documented format."""


class StudyNotFoundError(PreprocessError):
    """The requested StudyInstanceUID is not in the input."""
