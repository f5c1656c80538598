"""Series identification: vendor naming styles, axial T2W, highest/dedicated high-b DWI, ignored objects, rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from contract import SEQUENCES
from preprocessing.errors import NoT2WError
from preprocessing.pipeline import PreprocessSettings, preprocess_study
from preprocessing.series_selection import DEFAULT_RULES_PATH
from preprocessing.testing import SAGITTAL, blob, make_series

SMALL = {"rows": 16, "columns": 16, "num_slices": 4, "pixel_spacing_mm": (8.0, 8.0), "slice_spacing_mm": 10.0}
DIFFUSION = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")
ADC_TYPE = ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")


def series(uid: str, description: str, number: int, **kw):
    args = {**SMALL, **kw}
    return make_series(
        description=description, value_fn=blob((0, 0, 0), sigma_mm=20.0), study_uid=uid, series_number=number, **args
    )


def vendor_study(vendor: str) -> tuple[list[pydicom.Dataset], dict[str, str]]:
    """A study named in one vendor's style, and the expected chosen descriptions."""
    uid = generate_uid()
    if vendor == "siemens":
        names = [
            "localizer",
            "t2_tse_tra",
            "t2_tse_sag",
            "ep2d_diff_b50_400_800_1400",
            "ep2d_diff_b50_400_800_1400_ADC",
            "ep2d_diff_b1400_TRACEW",
        ]
        expected = {"t2w": "t2_tse_tra", "adc": names[4], "dwi": "ep2d_diff_b1400_TRACEW"}
        dwi_multi, dwi_dedicated = [50, 400, 800, 1400], [1400]
    elif vendor == "ge":
        names = [
            "3-plane loc",
            "Ax T2 FRFSE",
            "Sag T2 FRFSE",
            "Ax DWI b50_800_1400",
            "Apparent Diffusion Coefficient (mm2/s)",
            "Ax DWI b1400",
        ]
        expected = {"t2w": "Ax T2 FRFSE", "adc": names[4], "dwi": "Ax DWI b1400"}
        dwi_multi, dwi_dedicated = [50, 800, 1400], [0, 1400]  # GE high-b series usually carry b=0 too
    else:
        names = ["Survey", "T2W_TSE_ax", "T2W_TSE_sag", "DWI_b0_1000_1400", "dADC", "sDWI b1400"]
        expected = {"t2w": "T2W_TSE_ax", "adc": "dADC", "dwi": "sDWI b1400"}
        dwi_multi, dwi_dedicated = [0, 1000, 1400], [1400]
    loc_type = ("ORIGINAL", "PRIMARY", "LOCALIZER") if vendor == "siemens" else ("ORIGINAL", "PRIMARY", "OTHER")
    datasets = (
        series(uid, names[0], 1, image_type=loc_type, num_slices=3)
        + series(uid, names[2], 2, orientation=SAGITTAL, num_slices=6)  # more slices than the axial one
        + series(uid, names[1], 3)
        + series(uid, names[3], 4, b_values=dwi_multi, image_type=DIFFUSION)
        + series(uid, names[4], 5, image_type=ADC_TYPE)
        + series(uid, names[5], 6, b_values=dwi_dedicated, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"))
    )
    return datasets, expected


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_sequences_are_identified_across_vendor_naming_styles(vendor: str) -> None:
    datasets, expected = vendor_study(vendor)
    out = preprocess_study(datasets)
    chosen = {seq: out.meta["series"][seq]["description"] for seq in SEQUENCES}
    assert chosen == expected
    assert out.availability.tolist() == [1.0, 1.0, 1.0]
    assert out.meta["series"]["dwi"]["b_value"] == 1400.0
    assert "dedicated high-b series" in out.meta["series"]["dwi"]["reason"]
    # the localizer is skipped with its reason, the sagittal T2W is reported as the loser
    reasons = {s["source"]: s["reason"] for s in out.meta["skipped"]}
    assert any(src.startswith("series '") and "localizer" in r for src, r in reasons.items()), reasons
    assert "axial preferred" in out.meta["series"]["t2w"]["reason"]
    assert "sagittal" in out.meta["series"]["t2w"]["reason"]
    json.dumps(out.meta)  # JSON-serializable


def test_axial_t2w_is_chosen_over_sagittal_and_coronal() -> None:
    uid = generate_uid()
    datasets = (
        series(uid, "t2_tse_sag", 2, orientation=SAGITTAL, num_slices=8)
        + series(uid, "t2_tse_cor", 3, orientation=(1.0, 0, 0, 0, 0, -1.0), num_slices=8)
        + series(uid, "t2_tse_tra", 4)
    )
    out = preprocess_study(datasets)
    assert out.meta["series"]["t2w"]["description"] == "t2_tse_tra"
    assert abs(out.geometry.direction_matrix[2, 2]) == pytest.approx(1.0)  # grid slice axis along patient z


def test_highest_b_value_is_taken_from_a_multi_b_series() -> None:
    uid = generate_uid()
    datasets = series(uid, "t2_tse_tra", 1) + series(uid, "DWI_b0_800_1000_1400", 2, b_values=[0, 800, 1000, 1400])
    out = preprocess_study(datasets)
    dwi = out.meta["series"]["dwi"]
    assert dwi["b_value"] == 1400.0
    assert dwi["num_frames"] == SMALL["num_slices"]  # only the b=1400 frames of the 4 x 4 instances
    assert "split of multi-b series [0, 800, 1000, 1400]" in dwi["reason"]


def test_dedicated_high_b_series_is_preferred_unless_the_rules_file_says_otherwise(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = (
        series(uid, "t2_tse_tra", 1)
        + series(uid, "ep2d_diff_b50_400_800_1400", 2, b_values=[50, 400, 800, 1400])
        + series(uid, "ep2d_diff_b1000_TRACEW", 3, b_values=[1000])
    )
    default = preprocess_study(datasets)
    assert (default.meta["series"]["dwi"]["description"], default.meta["series"]["dwi"]["b_value"]) == (
        "ep2d_diff_b1000_TRACEW",
        1000.0,
    )
    rules = json.loads(DEFAULT_RULES_PATH.read_text())
    rules["sequences"]["dwi"]["prefer_dedicated_high_b"] = False
    site_rules = tmp_path / "site_rules.json"
    site_rules.write_text(json.dumps(rules))
    site = preprocess_study(datasets, PreprocessSettings(rules_path=site_rules))
    assert (site.meta["series"]["dwi"]["description"], site.meta["series"]["dwi"]["b_value"]) == (
        "ep2d_diff_b50_400_800_1400",
        1400.0,
    )
    assert site.meta["rules"] == str(site_rules)


def test_site_rules_file_can_rename_sequences(tmp_path: Path) -> None:
    """Identification is data: a site whose T2W is called 'PROSTATE_T2_AXIAL_HR' adds one pattern."""
    uid = generate_uid()
    datasets = series(uid, "PROSTATE_AXIAL_HR", 1)
    rules = json.loads(DEFAULT_RULES_PATH.read_text())
    rules["sequences"]["t2w"]["match_any"]["description_patterns"].append("(?i)prostate_axial_hr")
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    with pytest.raises(NoT2WError):
        preprocess_study(datasets)
    assert preprocess_study(datasets, PreprocessSettings(rules_path=path)).meta["series"]["t2w"]["description"] == (
        "PROSTATE_AXIAL_HR"
    )


@pytest.mark.parametrize("tag", ["ge", "siemens", "description"])
def test_b_values_from_vendor_private_tags_or_description(tag: str) -> None:
    uid = generate_uid()
    b_values = [0, 1400] if tag != "description" else [1400]
    dwi = series(uid, "Ax DWI b1400" if tag == "description" else "Ax DWI", 2, b_values=b_values)
    for ds in dwi:
        b = float(ds.DiffusionBValue)
        del ds.DiffusionBValue
        if tag == "ge":
            ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
            ds.add_new(0x00431039, "IS", [int(b) + 1_000_000_000, 0, 0, 0])
        elif tag == "siemens":
            ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
            ds.add_new(0x0019100C, "IS", int(b))
    out = preprocess_study(series(uid, "t2_tse_tra", 1) + dwi)
    assert out.meta["series"]["dwi"]["b_value"] == 1400.0
    assert out.meta["series"]["dwi"]["num_frames"] == SMALL["num_slices"]
    if tag == "description":
        assert "from SeriesDescription" in out.meta["series"]["dwi"]["reason"]


def test_dwi_without_high_b_is_missing_with_a_warning() -> None:
    uid = generate_uid()
    out = preprocess_study(series(uid, "t2_tse_tra", 1) + series(uid, "DWI b0 b500", 2, b_values=[0, 500]))
    assert out.availability[SEQUENCES.index("dwi")] == 0.0
    assert any(w.startswith("dwi missing") and "800" in w for w in out.meta["warnings"])


def test_non_image_objects_secondary_captures_and_other_modalities_are_skipped_with_reasons() -> None:
    sr_path = get_testdata_file("test-SR.dcm", download=False)
    ct_path = get_testdata_file("CT_small.dcm", download=False)
    assert sr_path and os.path.exists(sr_path) and ct_path and os.path.exists(ct_path)
    uid = generate_uid()
    capture = series(uid, "t2 screenshot", 7)
    for ds in capture:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ct = pydicom.dcmread(ct_path)
    ct.StudyInstanceUID = uid
    datasets = series(uid, "t2_tse_tra", 1) + capture + [pydicom.dcmread(sr_path), ct]
    out = preprocess_study(datasets)
    reasons = [s["reason"] for s in out.meta["skipped"]]
    assert "non-image object (Comprehensive SR Storage)" in reasons
    assert any(r.startswith("derived secondary capture") for r in reasons)
    assert "not MR (modality CT)" in reasons
    assert out.meta["series"]["t2w"]["description"] == "t2_tse_tra"


def test_several_studies_need_a_choice_and_the_choice_is_used() -> None:
    a, b = generate_uid(), generate_uid()
    datasets = series(a, "t2_tse_tra", 1) + series(b, "Ax T2 FRFSE", 1)
    out = preprocess_study(datasets, PreprocessSettings(study_instance_uid=b))
    assert out.meta["series"]["t2w"]["description"] == "Ax T2 FRFSE"
    assert {"other study"} == {s["reason"] for s in out.meta["skipped"]}
    assert np.isfinite(out.tensor).all()


def test_derived_diffusion_maps_are_not_taken_for_adc_or_dwi() -> None:
    """GE's exponential ADC and Siemens' FA map look like diffusion series but are neither ADC nor DWI."""
    uid = generate_uid()
    datasets = (
        series(uid, "Ax T2 FRFSE", 1)
        + series(uid, "Apparent Diffusion Coefficient (mm2/s)", 2, image_type=ADC_TYPE)
        + series(uid, "Exponential Apparent Diffusion Coefficient", 3, image_type=("DERIVED", "PRIMARY"))
        + series(uid, "ep2d_diff_b50_800_1400_FA", 4, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "FA"))
        + series(uid, "Ax DWI b1400", 5, b_values=[0, 1400])
    )
    out = preprocess_study(datasets)
    assert out.meta["series"]["adc"]["description"] == "Apparent Diffusion Coefficient (mm2/s)"
    assert out.meta["series"]["dwi"]["description"] == "Ax DWI b1400"
    unidentified = {s["source"] for s in out.meta["skipped"] if s["reason"] == "matches no sequence rule"}
    assert unidentified == {
        "series 'Exponential Apparent Diffusion Coefficient'",
        "series 'ep2d_diff_b50_800_1400_FA'",
    }
