"""Tests for the synthetic demo federation (:mod:`client.dicom.synth`).

Calibration (measured when the defaults were chosen; 500 patients/site, 64x64, CPU): pixels
read with the modality LUT, per-image z-score, resized to 32x32; 3-block GroupNorm CNN
(16/32/32 channels); one random image per patient per step; Opacus Poisson sampling, batch 32,
max_grad_norm 1.0, epsilon 8 / delta 1e-5 over the whole run (noise multiplier ~0.82); SGD
momentum 0.9; FedAvg over 3 sites, 1 local epoch per round; pooled test = 15% of each site.

* DP, lr 0.05, z-score, 8 rounds: AUC 0.941 (data seed 0), 0.929 (seed 1); >= 0.90 from round 3.
* DP, lr 0.1, 1-99 percentile scaling, 6 rounds: AUC 0.973 (seed 0), 0.984 (seed 1).
* Non-private, one round: AUC 0.33-0.97 over the four runs, never 1.0.
* Centralised non-private Adam, 10 epochs: AUC 0.975 (occult lesions cap the Bayes AUC).
* Generation of 3 x 500 patients: ~13 s on 2 cores.

These numbers are not asserted here (too slow for unit tests).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from client.dicom.scan import scan_directory
from client.dicom.synth import (
    LABELS_HEADER,
    SiteProfile,
    SiteSummary,
    default_profiles,
    physical_to_stored,
    synthesize_federation,
    synthesize_site,
)
from common.errors import ConfigError

PHI_TAGS = (
    (0x0010, 0x0030),  # Patient's Birth Date
    (0x0010, 0x1040),  # Patient's Address
    (0x0010, 0x2154),  # Patient's Telephone Numbers
    (0x0010, 0x1000),  # Other Patient IDs
    (0x0010, 0x1001),  # Other Patient Names
    (0x0008, 0x0090),  # Referring Physician's Name
    (0x0008, 0x0080),  # Institution Name
    (0x0008, 0x0081),  # Institution Address
)
DATE_TAGS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteSummary]]:
    out = tmp_path_factory.mktemp("fed")
    summaries = synthesize_federation(out, n_sites=3, patients_per_site=6, image_size=32, seed=7)
    return out, summaries


def _files(root: Path) -> Iterator[Path]:
    return iter(sorted(root.rglob("*.dcm")))


def _labels(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "labels.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == LABELS_HEADER
        return list(reader)


def test_layout_and_summaries(federation: tuple[Path, list[SiteSummary]]) -> None:
    out, summaries = federation
    assert [s.site for s in summaries] == ["site-1", "site-2", "site-3"]
    for summary in summaries:
        files = list(_files(summary.path / "dicom"))
        assert summary.path == out / summary.site
        assert summary.patients == 6
        assert summary.images == len(files)
        assert 2 * 6 <= summary.images <= 4 * 6
        assert summary.positives == sum(int(r["label"]) for r in _labels(summary.path))
        for path in files:
            rel = path.relative_to(summary.path / "dicom").parts
            assert len(rel) == 4 and rel[3].startswith("IM")


def test_files_read_back_with_valid_meta_and_pixels(
    federation: tuple[Path, list[SiteSummary]],
) -> None:
    out, _ = federation
    for path in _files(out):
        ds = pydicom.dcmread(path)
        assert ds.preamble is not None
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.ImplementationClassUID
        assert ds.Modality == "CT"
        assert ds.pixel_array.shape == (32, 32)
        assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (32, 32, 1)
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.Manufacturer
        assert float(ds.PixelSpacing[0]) > 0


def test_modality_lut_gives_physical_range(federation: tuple[Path, list[SiteSummary]]) -> None:
    out, _ = federation
    for path in _files(out):
        ds = pydicom.dcmread(path)
        hu = apply_modality_lut(ds.pixel_array, ds)
        # Air outside the body, soft tissue inside; nothing beyond a plausible CT range.
        assert -1100.0 <= float(hu.min()) <= -900.0
        assert float(np.median(hu[12:20, 12:20])) > -200.0
        assert float(hu.max()) < 3000.0


def test_uids_unique_and_labels_join_every_study(
    federation: tuple[Path, list[SiteSummary]],
) -> None:
    out, summaries = federation
    sop_uids: list[str] = []
    studies: dict[str, set[str]] = {}
    for path in _files(out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop_uids.append(ds.SOPInstanceUID)
        studies.setdefault(ds.StudyInstanceUID, set()).add(ds.PatientID)
    assert len(sop_uids) == len(set(sop_uids))
    assert all(len(patients) == 1 for patients in studies.values())
    rows = [row for s in summaries for row in _labels(s.path)]
    assert {r["study_uid"] for r in rows} == set(studies)
    assert len(rows) == len(studies) == 18
    for row in rows:
        assert studies[row["study_uid"]] == {row["patient_id"]}
        assert row["label"] in {"0", "1"}


def test_no_phi(federation: tuple[Path, list[SiteSummary]]) -> None:
    out, _ = federation
    for path in _files(out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in PHI_TAGS:
            assert tag not in ds, f"{tag} present"
        for keyword in DATE_TAGS:
            assert keyword not in ds
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod
        assert str(ds.PatientName) == ds.PatientID
        assert ds.PatientID.startswith(("S1-P", "S2-P", "S3-P"))


def test_every_synthetic_file_passes_the_deidentification_gate(
    federation: tuple[Path, list[SiteSummary]],
) -> None:
    # Prepare
    out, summaries = federation
    # Execute
    outcomes = [scan_directory(s.path, exclude=("labels.csv",)) for s in summaries]
    # Assert
    assert all(not o.skipped for o in outcomes), [s.text for o in outcomes for s in o.skipped]
    assert sum(len(o.records) for o in outcomes) == len(list(_files(out)))
    assert all(r.deidentification_options == ("113100", "113105") for o in outcomes for r in o.records)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    profile = default_profiles(2)[1]

    def pixels(folder: str, seed: int) -> list[bytes]:
        synthesize_site(
            tmp_path / folder, profile, site_index=1, patients=3, image_size=24, seed=seed
        )
        return [pydicom.dcmread(p).PixelData for p in _files(tmp_path / folder)]

    first, again, other = pixels("a", 3), pixels("b", 3), pixels("c", 4)
    assert first == again
    assert first != other
    labels_a = (tmp_path / "a" / "labels.csv").read_bytes()
    assert labels_a == (tmp_path / "b" / "labels.csv").read_bytes()


def test_site_profiles_differ() -> None:
    profiles = default_profiles(5)
    assert [p.name for p in profiles] == [f"site-{k}" for k in range(1, 6)]
    conventions = {(p.rescale_slope, p.rescale_intercept, p.pixel_representation) for p in profiles}
    assert len(conventions) == 3
    assert len({p.noise_sd for p in profiles}) == 5
    assert len({p.prevalence for p in profiles[:3]}) == 3
    assert len({p.pixel_spacing_mm(64) for p in profiles}) == 5
    assert len({p.manufacturer for p in profiles[:3]}) == 3


def test_prevalence_follows_profile(tmp_path: Path) -> None:
    # Fixed seed: deterministic; tolerance is > 3 binomial standard deviations at n = 100.
    for index, profile in enumerate(default_profiles(3)):
        summary = synthesize_site(
            tmp_path / profile.name,
            profile,
            site_index=index,
            patients=100,
            images_per_patient=(1, 1),
            image_size=16,
            seed=11,
        )
        assert abs(summary.positives / 100 - profile.prevalence) < 0.16


@pytest.mark.parametrize(
    ("slope", "intercept", "bits", "signed", "physical", "stored"),
    [
        (1.0, -1024.0, 12, 0, [-2000.0, -1024.0, 40.0, 5000.0], [0, 0, 1064, 4095]),
        (0.5, -1024.0, 16, 0, [-1024.0, 0.0, 100.4], [0, 2048, 2249]),
        (1.0, 0.0, 16, 1, [-1000.0, 40000.0], [-1000, 32767]),
    ],
)
def test_physical_to_stored(
    slope: float,
    intercept: float,
    bits: int,
    signed: int,
    physical: list[float],
    stored: list[int],
) -> None:
    profile = SiteProfile(
        name="x",
        intensity_scale=1.0,
        intensity_offset=0.0,
        noise_sd=0.0,
        lesion_contrast=0.0,
        prevalence=0.5,
        rescale_slope=slope,
        rescale_intercept=intercept,
        bits_stored=bits,
        pixel_representation=signed,
        manufacturer="Test",
    )
    result = physical_to_stored(np.array(physical), profile)
    assert result.tolist() == stored


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        synthesize_federation(tmp_path, patients_per_site=0)
    with pytest.raises(ConfigError):
        synthesize_federation(tmp_path, images_per_patient=(3, 2))
    with pytest.raises(ConfigError):
        default_profiles(0)
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "keep.txt").write_text("real data")
    with pytest.raises(ConfigError):
        synthesize_federation(tmp_path, patients_per_site=1)


def test_progress_counts_every_patient(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    synthesize_federation(
        tmp_path,
        n_sites=2,
        patients_per_site=2,
        image_size=16,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_thousand_site_profiles_stay_plausible_and_distinct() -> None:
    # Prepare
    first = default_profiles(21)
    # Execute
    profiles = default_profiles(1000)
    # Assert: the first 21 (vesalius synth's old maximum was 20) as before; then bounded
    assert profiles[:21] == first
    assert len({(p.intensity_scale, p.noise_sd, p.field_of_view_mm) for p in profiles}) == 1000
    assert max(p.field_of_view_mm for p in profiles) <= 500.0
    assert max(p.noise_sd for p in profiles) <= 42.0
    assert max(p.intensity_scale for p in profiles) < 1.3
    assert all(0.0 < p.prevalence <= 0.7 for p in profiles)
