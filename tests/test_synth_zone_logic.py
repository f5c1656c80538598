"""The generator follows PI-RADS v2.1 zone logic, so that every sequence is needed (docs/synthetic_studies.md).

* PZ: judged on DWI/ADC. Cancer T2 ranges from clearly dark to nearly iso; haemorrhage has a cancer-like
  ADC and T2 but no high-b brightness; prostatitis has a mildly low ADC and a mildly bright DWI.
* TZ: judged on T2W. Stromal BPH overlaps TZ cancer on ADC/DWI; only its rim, sharp edge and texture
  (T2W morphology) tell them apart. TZ cancer is ill-defined, homogeneous and rimless.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_synth import geometry_of, high_b_stack, volume_of

from contract import GridGeometry
from synth import anatomy as anat
from synth.generator import SynthConfig, synthesize_study

RANGES = anat.AnatomyRanges()
#: documented lesion frequencies (docs/synthetic_studies.md, "Lesions"): expected lesions per 100 studies
DOCUMENTED_PER_100_STUDIES = {
    ("cancer", "pz"): 35.0,
    ("cancer", "tz"): 15.0,
    ("bph_nodule", "tz"): 17.25,
    ("bph_stromal", "tz"): 14.375,
    ("inflammation", "pz"): 14.375,
    ("haemorrhage", "pz"): 11.5,
}
N_ANATOMIES = 300


@pytest.fixture(scope="module")
def anatomies() -> list[anat.Anatomy]:
    return [anat.sample_anatomy(np.random.default_rng([77, i]), np.zeros(3), RANGES) for i in range(N_ANATOMIES)]


def lesions_of(anatomies: list[anat.Anatomy], kind: str, zone: str | None = None) -> list[anat.Lesion]:
    return [les for a in anatomies for les in a.lesions if les.kind == kind and (zone is None or les.zone == zone)]


def t2_contrast(anatomy: anat.Anatomy, lesion: anat.Lesion) -> float:
    return lesion.tissue.t2 / anatomy.tissues[lesion.zone].t2


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    )


def single_kind_config(kind: str, diameter_mm: tuple[float, float] = (12.0, 18.0)) -> SynthConfig:
    """Every study has exactly one mimic of ``kind`` (no cancer)."""
    ranges = dataclasses.replace(
        RANGES, p_no_lesion=0.0, p_cancer=0.0, mimic_weights=((kind, 1.0),), lesion_diameter_mm=diameter_mm
    )
    return SynthConfig(anatomy=ranges)


def fine_grid(center: np.ndarray, half_mm: float = 14.0, spacing_mm: float = 0.4) -> GridGeometry:
    n = int(2 * half_mm / spacing_mm)
    origin = np.asarray(center) - half_mm
    return GridGeometry(
        origin_lps_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        spacing_mm_ijk=(spacing_mm, spacing_mm, spacing_mm),
        size_ijk=(n, n, n),
    )


def test_every_kind_lies_in_its_zone_at_the_documented_frequency(anatomies: list[anat.Anatomy]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for a in anatomies:
        for les in a.lesions:
            assert les.zone in anat.LESION_ZONES[les.kind]
            expected_code = anat.ZONE_TZ if les.zone == "tz" else anat.ZONE_PZ
            assert int(a.zone_at(les.shape.center_lps_mm)) == expected_code
            counts[(les.kind, les.zone)] = counts.get((les.kind, les.zone), 0) + 1
    assert set(counts) == set(DOCUMENTED_PER_100_STUDIES)
    for key, per_100 in DOCUMENTED_PER_100_STUDIES.items():
        expected = per_100 * N_ANATOMIES / 100
        # Poisson-like spread: 3.5 sigma, plus a few lesions that find no free place in small glands
        assert expected - 3.5 * np.sqrt(expected) - 3 <= counts[key] <= expected + 3.5 * np.sqrt(expected), key


def test_every_kind_follows_the_pirads_rule(anatomies: list[anat.Anatomy]) -> None:
    by_kind: dict[str, set[int]] = {}
    for a in anatomies:
        for les in a.lesions:
            assert les.pirads == anat.pirads_category(les.kind, les.diameter_mm, les.tissue.adc, les.dwi_contrast)
            assert les.significant == (les.kind == "cancer")
            by_kind.setdefault(les.kind, set()).add(les.pirads)
    assert by_kind["cancer"] == {4, 5}
    assert by_kind["bph_stromal"] == {2, 3}  # low ADC + marked DWI: often 3
    assert by_kind["bph_nodule"] == by_kind["inflammation"] == by_kind["haemorrhage"] == {2}
    assert anat.pirads_category("haemorrhage", 12.0, 800, 0.9) == 2
    assert anat.pirads_category("bph_stromal", 12.0, 900, 2.4) == 3


def test_haemorrhage_has_cancer_range_adc_and_dark_t2_but_no_high_b_brightness(
    anatomies: list[anat.Anatomy],
) -> None:
    haem = [(a, les) for a in anatomies for les in a.lesions if les.kind == "haemorrhage"]
    assert len(haem) >= 15
    for a, les in haem:
        assert les.dwi_contrast <= 1.0 + 1e-9
        assert RANGES.cancer_adc[0] <= les.tissue.adc <= 1100.0
        assert t2_contrast(a, les) <= 0.3
    pz_cancer_dwi = np.array([les.dwi_contrast for les in lesions_of(anatomies, "cancer", "pz")])
    assert np.all(pz_cancer_dwi > 1.2)  # only the DWI tells haemorrhage from PZ cancer


def test_haemorrhage_in_a_synthesized_study_has_low_adc_but_is_not_bright_on_high_b() -> None:
    """On the noisy DICOM volumes (PSF, bias, Rician noise, fitted ADC): ADC far below the PZ, DWI not above it."""
    study = synthesize_study(31, 0, single_kind_config("haemorrhage"))
    (les,) = study.anatomy.lesions
    assert les.kind == "haemorrhage" and les.zone == "pz"
    (entry,) = study.truth["lesions"]
    assert entry["kind"] == "haemorrhage" and entry["pirads"] == 2 and not entry["significant"]
    assert entry["dwi_contrast"] <= 1.0 and entry["t2_contrast"] <= 0.3 and entry["rim"] is False
    geom = geometry_of(study.series["adc"])
    adc, dwi = volume_of(study.series["adc"]), volume_of(high_b_stack(study.series))
    labels, zones = anat.lesion_label_map(study.anatomy, geom), anat.zone_map(study.anatomy, geom)
    inside, pz = labels == 1, (zones == anat.ZONE_PZ) & (labels == 0)
    assert inside.sum() >= 5 and pz.sum() >= 50
    assert np.median(adc[inside]) < np.median(adc[pz]) - 400
    assert np.median(dwi[inside]) <= 1.1 * np.median(dwi[pz])


def test_pz_cancer_t2_ranges_from_clearly_dark_to_nearly_iso(anatomies: list[anat.Anatomy]) -> None:
    pz = [(a, les) for a in anatomies for les in a.lesions if les.kind == "cancer" and les.zone == "pz"]
    ratios = np.array([t2_contrast(a, les) for a, les in pz])
    assert ratios.min() < 0.45 and ratios.max() > 0.8
    # T2 alone does not separate PZ cancer from prostatitis
    inflammation = np.array([t2_contrast(a, les) for a in anatomies for les in a.lesions if les.kind == "inflammation"])
    assert 0.2 < auroc(inflammation, ratios) < 0.8
    # but DWI/ADC does: prostatitis is never marked on DWI and its ADC is only mildly reduced
    prostatitis = lesions_of(anatomies, "inflammation")
    assert max(les.dwi_contrast for _, les in pz) > max(les.dwi_contrast for les in prostatitis)
    assert all(les.dwi_contrast < anat.PIRADS_DWI_MARKED_RATIO for les in prostatitis)
    assert all(1000.0 <= les.tissue.adc <= 1400.0 for les in prostatitis)


def test_stromal_bph_overlaps_tz_cancer_on_adc_and_dwi_but_has_a_rim(anatomies: list[anat.Anatomy]) -> None:
    cancer, stromal = lesions_of(anatomies, "cancer", "tz"), lesions_of(anatomies, "bph_stromal")
    assert len(cancer) >= 15 and len(stromal) >= 15
    # neither ADC nor the high-b DWI separates them well (AUROC near chance, far from 1)
    assert 0.2 < auroc(np.array([c.tissue.adc for c in cancer]), np.array([s.tissue.adc for s in stromal])) < 0.8
    assert 0.2 < auroc(np.array([c.dwi_contrast for c in cancer]), np.array([s.dwi_contrast for s in stromal])) < 0.8
    # nor does the core T2 darkness
    core = {id(les): t2_contrast(a, les) for a in anatomies for les in a.lesions}
    assert 0.2 < auroc(np.array([core[id(c)] for c in cancer]), np.array([core[id(s)] for s in stromal])) < 0.8
    for les in stromal:
        assert les.rim_t2 is not None and les.rim_t2 < les.tissue.t2  # dark capsule
        assert les.edge_mm <= 0.5 and les.texture_t2 >= 0.2  # circumscribed, heterogeneous
    for les in cancer:
        assert les.rim_t2 is None and les.texture_t2 <= 0.05


def test_tz_cancers_are_ill_defined_lenticular_and_glandular_bph_is_bright(anatomies: list[anat.Anatomy]) -> None:
    for les in lesions_of(anatomies, "cancer", "tz"):
        assert les.edge_mm >= 0.8 >= 2 * 0.4  # at least twice the BPH edge width
        axes = np.sort(les.shape.semi_axes_mm)
        assert axes[0] <= 0.6 * axes[2] + 1e-9
    for a in anatomies:
        for les in a.lesions:
            if les.kind == "bph_nodule":
                assert t2_contrast(a, les) > 1.1 and les.tissue.adc >= 1100.0 and les.rim_t2 is not None


def test_rendered_stromal_bph_has_a_dark_rim_and_tz_cancer_a_soft_edge() -> None:
    """Noise-free T2 on a 0.4 mm grid: the BPH shell is darker than its core; the cancer's edge band is wider."""
    edge_fraction = {}
    for kind in ("bph_stromal", "cancer"):
        ranges = dataclasses.replace(
            RANGES,
            p_no_lesion=0.0,
            p_cancer=1.0 if kind == "cancer" else 0.0,
            p_cancer_in_tz=1.0,
            p_mimic_with_cancer=0.0,
            mimic_weights=((kind if kind != "cancer" else "bph_nodule", 1.0),),
            lesion_diameter_mm=(14.0, 16.0),
        )
        anatomy = anat.sample_anatomy(np.random.default_rng([5, 1]), np.zeros(3), ranges)
        les = next(les for les in anatomy.lesions if les.kind == kind)
        assert les.zone == "tz"
        grid = fine_grid(les.shape.center_lps_mm)
        res = anat.lesion_weight(anatomy, grid, les)
        assert res is not None
        block, w, r_eff = res
        sl = tuple(slice(a, b) for a, b in block)
        t2 = anat.render(anatomy, grid, fields=("t2",)).t2
        assert t2 is not None
        t2b = t2[sl]
        if kind == "bph_stromal":
            shell = (r_eff > 0.85) & (r_eff < 0.98) & (w > 0.5)
            core = r_eff < 0.5
            assert np.mean(t2b[shell]) < 0.85 * np.mean(t2b[core])
        edge_fraction[kind] = float(np.sum((w > 0.1) & (w < 0.9)) / np.sum(w >= 0.5))
    assert edge_fraction["cancer"] > 2.0 * edge_fraction["bph_stromal"]
