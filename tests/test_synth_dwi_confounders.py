"""The two high-b DWI confounders of generator version 3 (docs/synthetic_studies.md).

* Rectal-gas susceptibility artifact: bright on high-b DWI at the rectal side of the gland (as bright as a
  PZ cancer), it scales every b-value alike so the fitted ADC is not lowered, T2W does not show it, and it
  appears in half of the studies with rectal gas.
* T2 shine-through (``cyst``): bright on T2W and on high-b DWI, with a high ADC (PI-RADS 2).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_synth import geometry_of, high_b_stack, volume_of

from synth import anatomy as anat
from synth import artifacts
from synth.generator import SynthConfig, SyntheticStudy, synthesize_study

RANGES = artifacts.DwiArtifactRanges()
NO_ARTIFACT = SynthConfig(dwi_artifact=dataclasses.replace(RANGES, p_given_rectal_gas=0.0))
#: documented rates: 60 % of rectal lumina are gas (synth.anatomy), half of those have the artifact
P_RECTAL_GAS = 0.6
#: (seed, index) of studies with the artifact (found with the default config)
ARTIFACT_STUDIES = ((5, 1), (5, 4))


@pytest.fixture(scope="module")
def pairs() -> list[tuple[SyntheticStudy, SyntheticStudy]]:
    """Each artifact study with the same study rendered without the artifact."""
    return [(synthesize_study(s, i), synthesize_study(s, i, NO_ARTIFACT)) for s, i in ARTIFACT_STUDIES]


def window(study: SyntheticStudy, key: str) -> tuple[np.ndarray, np.ndarray, tuple[int, slice, slice]]:
    """(high-b volume, ADC volume, a 5 x 7 voxel in-plane window around the artifact centre)."""
    assert study.dwi_artifact is not None
    stack = high_b_stack(study.series)
    geom = geometry_of(stack)
    k, j, i = (int(v) for v in np.round(geom.lps_to_index(study.dwi_artifact.center_lps_mm)))
    return volume_of(stack), volume_of(study.series[key]), (k, slice(j - 2, j + 3), slice(i - 3, i + 4))


def test_artifact_appears_in_half_of_the_studies_with_rectal_gas() -> None:
    n = 400
    gas = hits = 0
    for i in range(n):
        anatomy = anat.sample_anatomy(np.random.default_rng([78, i]), np.zeros(3), anat.AnatomyRanges())
        artifact = artifacts.sample_dwi_artifact(np.random.default_rng([78, i, 1]), anatomy, RANGES)
        gas += artifacts.has_rectal_gas(anatomy)
        if artifact is not None:
            assert artifacts.has_rectal_gas(anatomy)
            hits += 1
    rate = P_RECTAL_GAS * RANGES.p_given_rectal_gas
    assert abs(hits / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert abs(hits / gas - RANGES.p_given_rectal_gas) < 0.1


def test_artifact_lies_at_the_rectal_side_of_the_gland(pairs: list[tuple[SyntheticStudy, SyntheticStudy]]) -> None:
    for study, _ in pairs:
        art, anatomy = study.dwi_artifact, study.anatomy
        assert art is not None and anatomy is not None
        gl = anatomy.gland
        local = gl.rotation.T @ (art.center_lps_mm - gl.center_lps_mm) / gl.semi_axes_mm
        assert local[1] >= RANGES.depth_fraction[0] - 1e-9  # posterior (LPS y +), towards the rectum
        assert abs(local[0]) <= 0.2 + 1e-9
        rectum = next(shape for name, shape in anatomy.structures if name == "rectal_wall")
        assert gl.center_lps_mm[1] < art.center_lps_mm[1] < rectum.center_lps_mm[1]
        assert study.truth["dwi_artifact"] is True
        assert study.truth["dwi_artifact_center_lps_mm"] == [round(float(v), 4) for v in art.center_lps_mm]


def test_artifact_is_as_bright_as_a_cancer_on_high_b(pairs: list[tuple[SyntheticStudy, SyntheticStudy]]) -> None:
    for study, clean in pairs:
        high_b, _, win = window(study, "adc")
        clean_b = volume_of(high_b_stack(clean.series))  # same protocol and grid
        # the pile-up at least doubles the signal there, to >= 1.5 x the PZ (PZ cancers are >= 1.5 x, median 3 x)
        assert high_b[win].max() >= 1.8 * clean_b[win].max()
        anatomy = study.anatomy
        assert anatomy is not None
        geom = geometry_of(high_b_stack(study.series))
        gl = anatomy.gland
        pz_point = gl.center_lps_mm + gl.rotation @ (gl.semi_axes_mm * np.array([0.5, 0.4, 0.0]))
        k, j, i = (int(v) for v in np.round(geom.lps_to_index(pz_point)))
        pz = float(np.median(clean_b[k, j - 1 : j + 2, i - 1 : i + 2]))
        assert high_b[win].max() >= 2.0 * pz


def test_artifact_does_not_lower_adc_and_t2w_does_not_show_it(
    pairs: list[tuple[SyntheticStudy, SyntheticStudy]],
) -> None:
    for study, clean in pairs:
        _, adc, win = window(study, "adc")
        clean_adc = volume_of(clean.series["adc"])
        assert np.median(adc[win]) >= 0.95 * np.median(clean_adc[win])
        assert np.median(adc[win]) > anat.PIRADS_MIMIC_ADC_THRESHOLD
        for a, b in zip(study.series["t2w_tra"], clean.series["t2w_tra"], strict=True):
            assert np.array_equal(a.pixel_array, b.pixel_array)
        assert clean.truth["dwi_artifact"] is False and clean.truth["dwi_artifact_center_lps_mm"] is None
        # everything but the artifact fields is the same study
        same = {k: v for k, v in study.truth.items() if not k.startswith("dwi_artifact")}
        assert same == {k: v for k, v in clean.truth.items() if not k.startswith("dwi_artifact")}


def test_cysts_come_only_on_top_of_lesions_at_the_documented_rate() -> None:
    ranges = anat.AnatomyRanges()
    n = 300
    with_lesions = cysts = 0
    for i in range(n):
        base = anat.sample_anatomy(np.random.default_rng([79, i]), np.zeros(3), ranges)
        anatomy = anat.add_incidental_cyst(np.random.default_rng([79, i, 2]), base, ranges)
        assert anatomy.lesions[: len(base.lesions)] == base.lesions
        extra = anatomy.lesions[len(base.lesions) :]
        assert len(extra) <= 1 and (base.lesions or not extra)
        with_lesions += bool(base.lesions)
        for cyst in extra:
            cysts += 1
            assert cyst.kind == "cyst" and not cyst.significant and cyst.pirads == 2
            assert cyst.tissue.adc >= ranges.cyst_adc[0] and cyst.tissue.t2 >= ranges.cyst_t2[0]
            assert ranges.cyst_dwi_contrast[0] - 1e-9 <= cyst.dwi_contrast <= ranges.cyst_dwi_contrast[1] + 1e-9
    rate = ranges.p_cyst
    assert abs(cysts / with_lesions - rate) < 4 * np.sqrt(rate * (1 - rate) / with_lesions)


@pytest.mark.parametrize("zone_index", [0, 1])
def test_cyst_is_bright_on_t2w_and_high_b_with_a_high_adc(zone_index: int) -> None:
    """On the noisy DICOM volumes: DWI alone is fooled, ADC and T2W tell it is benign."""
    ranges = dataclasses.replace(
        anat.AnatomyRanges(),
        p_no_lesion=0.0,
        p_cancer=0.0,
        mimic_weights=(("cyst", 1.0),),
        cyst_diameter_mm=(10.0, 12.0),
        p_cyst_in_tz=float(zone_index),
    )
    study = synthesize_study(32, 0, SynthConfig(anatomy=ranges))
    anatomy = study.anatomy
    assert anatomy is not None
    (les,) = [les for les in anatomy.lesions if les.kind == "cyst"][:1]
    zone_code = anat.ZONE_TZ if zone_index else anat.ZONE_PZ
    assert les.zone == ("tz" if zone_index else "pz")
    entry = study.truth["lesions"][0]
    assert entry["kind"] == "cyst" and entry["pirads"] == 2 and not entry["significant"]
    for key in ("adc", "t2w_tra"):
        stack = study.series[key]
        geom = geometry_of(stack)
        labels, zones = anat.lesion_label_map(anatomy, geom), anat.zone_map(anatomy, geom)
        inside, background = labels == 1, (zones == zone_code) & (labels == 0)
        assert inside.sum() >= 5 and background.sum() >= 50
        if key == "t2w_tra":
            t2 = volume_of(stack)
            assert np.median(t2[inside]) >= 1.3 * np.median(t2[background])
        else:
            adc, dwi = volume_of(stack), volume_of(high_b_stack(study.series))
            assert np.median(adc[inside]) >= max(1500.0, np.median(adc[background]))
            assert np.median(dwi[inside]) >= 1.2 * np.median(dwi[background])
