"""Ingest end to end on tiny chests: formats, geometry, lung masks, resume, failures."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import MINI_SEGMENT, make_volume, mini_chest

from sscflow.cohort import read_manifest
from sscflow.config import IngestConfig
from sscflow.core import store as st
from sscflow.core.imageio import (
    deterministic_uid,
    input_fingerprint,
    read_volume,
    slice_thickness_of,
    write_dicom_series,
    write_volume,
)
from sscflow.methods.ingest import ingest_cohort
from sscflow.methods.quality import dice
from sscflow.methods.registration.stage import matched_thickness

SPHERE = ((7.3, -4.1, 0.4), 5.0)  # physical (z, y, x) mm and radius, in the mediastinum
PATIENT_NAME = "DOE^JANE^SECRET"
INGEST = IngestConfig(spacing_mm=1.0, chunk=32)


def chest(direction=None, spacing_xyz=(0.7, 0.7, 1.25), size_xyz=(157, 114, 40), **kw):
    d = np.eye(3) if direction is None else np.asarray(direction, float)
    half = d @ (np.asarray(size_xyz) * np.asarray(spacing_xyz) / 2)
    return make_volume(size_xyz, spacing_xyz, -half, d, fill=mini_chest(sphere=SPHERE, **kw))


def write_scan(image, path):
    if path.suffix == "" and not path.name.endswith(".nii.gz"):
        write_dicom_series(
            image,
            path,
            patient_id="MRN0042",
            patient_name=PATIENT_NAME,
            birth_date="19500101",
            series_uid=deterministic_uid(path),
            study_uid=deterministic_uid(path.parent),
        )
    else:
        write_volume(image, path)
    return path


def write_manifest(tmp_path, rows):
    lines = ["patient_id,baseline,followup,fvc_baseline,fvc_followup"]
    lines += [f"{pid},{b},{f},80,{fu}" for pid, b, f, fu in rows]
    p = tmp_path / "manifest.csv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_manifest(p)


def truth_lungs(geometry):
    """The mini chest's lungs evaluated on a stored grid: an analytic, independent truth."""
    z, y, x = np.meshgrid(
        *[
            o + s * np.arange(n)
            for o, s, n in zip(geometry.origin, geometry.spacing, geometry.shape, strict=True)
        ],
        indexing="ij",
    )
    inside = np.zeros(geometry.shape, bool)
    for side in (-1, 1):
        inside |= (z / 30.0) ** 2 + (y / 22.0) ** 2 + ((x - side * 24.0) / 16.0) ** 2 <= 1.0
    return inside


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    rows = []
    specs = [
        ("PD", np.diag([-1.0, 1.0, 1.0]), ""),
        ("PN", np.diag([1.0, 1.0, -1.0]), ".nii.gz"),
        ("PM", np.eye(3), ".mha"),
    ]
    for pid, d, suffix in specs:
        img = chest(d)
        b = write_scan(img, tmp / f"{pid}_base{suffix}")
        f = write_scan(img, tmp / f"{pid}_fu{suffix}")
        rows.append((pid, b.name, f.name, 70))
    return tmp, write_manifest(tmp, rows)


def test_ingest_on_cluster_geometry_and_masks(three_formats, client):
    tmp, manifest = three_formats
    store = str(tmp / "cohort.zarr")
    seen = []
    results = ingest_cohort(
        manifest,
        store,
        INGEST,
        MINI_SEGMENT,
        client=client,
        progress=lambda r, done, total: seen.append((done, total)),
    )
    assert [r.status for r in results] == ["done"] * 3, [r.message for r in results]
    assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]
    root = st.open_store(store, mode="r")
    assert st.patient_ids(root) == ["PD", "PM", "PN"]
    for pid in ("PD", "PN", "PM"):
        group = st.patient_group(root, pid, create=False)
        base = st.read_image(group, "baseline")
        hu = np.asarray(base.array[...])
        assert hu.dtype == np.int16 and base.geometry.spacing == (1.0, 1.0, 1.0)
        # the sphere (HU > 500) is where it was put, in physical space
        idx = np.argwhere(hu > 500)
        found = np.asarray(base.geometry.origin) + idx.mean(axis=0) * np.asarray(
            base.geometry.spacing
        )
        np.testing.assert_allclose(found, SPHERE[0], atol=0.5)
        # the lung mask matches the analytic lungs, including where they touch the end slices
        mask = st.read_image(group, "lung_mask")
        m = np.asarray(mask.array[...])
        assert dice(m, truth_lungs(mask.geometry)) > 0.95
        assert m[0].any() and m[-1].any()
        assert mask.meta["lung_volume_ml"] == pytest.approx(85.0, rel=0.06)  # analytic 85 mL
        assert base.meta["source"]["geometry"]["spacing"] == pytest.approx([1.25, 0.7, 0.7])
        # the slice thickness a DICOM series' headers give (written as 1.25 mm); a file says
        # only its slice spacing, which is not its thickness when it was resampled
        want = 1.25 if pid == "PD" else None
        assert base.meta["source"]["slice_thickness_mm"] == want
        follow = st.read_image(group, "followup")
        assert matched_thickness(base, follow, "auto") == (None if want is None else (want, want))
        assert matched_thickness(base, follow, True) == (1.25, 1.25)  # else the spacing
        assert matched_thickness(base, follow, False) is None
        assert group.attrs["sscflow"]["functional"] == "worsening"
        assert st.read_image(group, "followup_lung_mask").meta["of"] == "followup"


def test_no_dicom_identifier_reaches_the_store(three_formats, client):
    tmp, manifest = three_formats
    store = tmp / "cohort.zarr"
    ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT, client=client)
    blobs = b"".join(f.read_bytes() for f in store.rglob("*") if f.is_file())
    for secret in (b"DOE", b"JANE", b"MRN0042", b"19500101"):
        assert secret not in blobs


def _snapshot(store):
    return {str(f): os.stat(f).st_mtime_ns for f in store.rglob("*") if f.is_file()}


def test_rerun_rewrites_nothing_and_changed_input_is_redone(tmp_path):
    b = write_scan(chest(), tmp_path / "b.nii.gz")
    f = write_scan(chest(), tmp_path / "f.mha")
    b2 = write_scan(chest(), tmp_path / "b2.nii.gz")
    manifest = write_manifest(tmp_path, [("A", b.name, f.name, 75), ("B", b2.name, f.name, 75)])
    store = tmp_path / "c.zarr"
    first = ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT)
    assert [r.status for r in first] == ["done", "done"]
    before = _snapshot(store)
    second = ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT)
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert _snapshot(store) == before  # nothing rewritten

    # change patient A's follow-up content: only what depends on it is rewritten
    write_scan(chest(lung_z_radius=26.0), tmp_path / "f2.mha")
    manifest = write_manifest(tmp_path, [("A", b.name, "f2.mha", 75), ("B", b2.name, f.name, 75)])
    third = ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT)
    assert third[0].status == "done" and third[1].status == "skipped"
    assert third[0].written == ["followup", "followup_lung_labels", "followup_lung_mask"]
    after = _snapshot(store)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all("/A/followup" in k for k in changed)

    # a changed setting redoes everything it touches
    fourth = ingest_cohort(manifest, str(store), IngestConfig(spacing_mm=1.5), MINI_SEGMENT)
    assert [r.status for r in fourth] == ["done", "done"]
    assert (
        st.read_image(st.patient_group(st.open_store(store), "A"), "baseline").geometry.spacing
        == (1.5,) * 3
    )


def test_interrupted_output_is_redone(tmp_path):
    b = write_scan(chest(), tmp_path / "b.nii.gz")
    manifest = write_manifest(tmp_path, [("A", b.name, b.name, 75)])
    store = tmp_path / "c.zarr"
    ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT)
    group = st.patient_group(st.open_store(store), "A")
    group["followup"].attrs["sscflow"] = dict(group["followup"].attrs["sscflow"], complete=False)
    again = ingest_cohort(manifest, str(store), INGEST, MINI_SEGMENT)
    assert again[0].status == "done" and "followup" in again[0].written
    assert st.output_state(group, "followup") == "complete"


def test_bad_inputs_fail_alone_with_clear_messages(tmp_path):
    good = write_scan(chest(), tmp_path / "good.nii.gz")
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:200])
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(flat))
    no_air = write_scan(
        make_volume((20, 20, 10), (2, 2, 2), (0, 0, 0), fill=lambda z, y, x: 40 + 0 * x),
        tmp_path / "noair.mha",
    )
    solid = write_scan(
        make_volume(
            (40, 40, 10),
            (2, 2, 2),
            (-40, -40, 0),
            fill=lambda z, y, x: np.where(x**2 + y**2 < 900, 40, -1000),
        ),
        tmp_path / "solid.mha",
    )
    rows = [
        ("OK", good.name, good.name, 75),
        ("MISSING", "nowhere.nii.gz", good.name, 75),
        ("TRUNC", good.name, trunc.name, 75),
        ("FLAT", flat.name, good.name, 75),
        ("NOAIR", no_air.name, good.name, 75),
        ("NOLUNG", solid.name, good.name, 75),
    ]
    manifest = write_manifest(tmp_path, rows)
    results = {
        r.patient_id: r
        for r in ingest_cohort(manifest, str(tmp_path / "c.zarr"), INGEST, MINI_SEGMENT)
    }
    assert results["OK"].status == "done"
    expect = {
        "MISSING": r"patient MISSING: baseline .*nowhere\.nii\.gz does not exist; fix the path "
        r"in the manifest \(line 3\)",
        "TRUNC": r"patient TRUNC: follow-up .*trunc\.nii\.gz could not be read",
        "FLAT": r"patient FLAT: baseline .*flat\.nii\.gz has 2 dimensions",
        "NOAIR": r"patient NOAIR: baseline .*noair\.mha holds no air",
        "NOLUNG": r"patient NOLUNG: baseline .*solid\.mha: no air inside the body",
    }
    for pid, pattern in expect.items():
        assert results[pid].status == "failed"
        assert re.search(pattern, results[pid].message), results[pid].message
    # the scan that failed has neither image nor mask marked complete; one whose segmentation
    # failed keeps its canonical image (the segment stage reruns from it), not a mask
    root = st.open_store(tmp_path / "c.zarr", mode="r")
    failed_scan = {
        "MISSING": ("baseline", "lung_mask"),
        "TRUNC": ("followup", "followup_lung_mask"),
        "FLAT": ("baseline", "lung_mask"),
        "NOAIR": ("baseline", "lung_mask"),
        "NOLUNG": ("lung_mask", "lung_labels"),
    }
    assert st.output_state(st.patient_group(root, "NOLUNG", create=False), "baseline") == "complete"
    for pid, names in failed_scan.items():
        group = st.patient_group(root, pid, create=False)
        for name in names:
            assert st.output_state(group, name) != "complete", (pid, name)


def _series(image, folder, uid, prefix):
    """Write ``image`` as DICOM series ``uid`` into ``folder`` (files named ``prefix*``), beside
    whatever the folder already holds."""
    tmp = folder.parent / f"{folder.name}_{prefix}"
    files = write_dicom_series(image, tmp, patient_id="MRN0042", patient_name=PATIENT_NAME,
                               series_uid=uid, study_uid="1.2.826.0.1.3680043.2.1125.9")
    folder.mkdir(exist_ok=True)
    out = []
    for k, f in enumerate(files):
        out.append(folder / f"{prefix}{k:03d}.dcm")
        os.replace(f, out[-1])
    return out


def _poke_in_place(f, offset_from_end=200):
    """Change bytes of ``f`` near its end (pixel data) keeping its size and modification time."""
    stat = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(stat.st_size - offset_from_end)
        old = fh.read(8)
        fh.seek(stat.st_size - offset_from_end)
        fh.write(bytes(b ^ 0x55 for b in old))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert f.stat().st_size == stat.st_size and f.stat().st_mtime_ns == stat.st_mtime_ns


def test_skip_decision_follows_the_chosen_series_and_force_rereads(tmp_path):
    """Two series share a folder and the manifest picks one: changing the other ingests nothing
    again, changing the chosen one (content and time) does. An edit in place that keeps size and
    time is not seen (no pixel is read to decide), and ``force`` reads it."""
    folder = tmp_path / "dicom"
    uid1, uid2 = deterministic_uid("chosen"), deterministic_uid("other")
    chosen = _series(chest(), folder, uid1, "a")
    other = _series(chest(), folder, uid2, "b")
    fu = write_scan(chest(), tmp_path / "fu.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "patient_id,baseline,followup,baseline_series_uid\n"
        f"A,{folder.name},{fu.name},{uid1}\n", encoding="utf-8")  # fmt: skip
    manifest = read_manifest(tmp_path / "manifest.csv")
    store = str(tmp_path / "c.zarr")

    def statuses(**kw):
        return [r.written for r in ingest_cohort(manifest, store, INGEST, MINI_SEGMENT, **kw)]

    assert statuses() == [["baseline", "followup", "lung_labels", "lung_mask",
                           "followup_lung_labels", "followup_lung_mask"]]  # fmt: skip
    time.sleep(0.01)  # a new modification time for what is rewritten below
    for f in other:
        f.unlink()
    _series(chest(lung_z_radius=24.0), folder, uid2, "b")  # the other series changes
    assert statuses() == [[]]
    _poke_in_place(chosen[len(chosen) // 2])  # same size and time: not seen ...
    _poke_in_place(fu, 40)
    assert statuses() == [[]]
    assert statuses(force=True)[0][:1] == ["baseline"]  # ... until forced
    for f in chosen:
        f.unlink()
    _series(chest(lung_z_radius=24.0), folder, uid1, "a")  # the chosen series changes
    write_scan(chest(lung_z_radius=26.0), fu)  # the follow-up file, in place
    assert statuses() == [["baseline", "followup", "lung_labels", "lung_mask",
                           "followup_lung_labels", "followup_lung_mask"]]  # fmt: skip


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text(encoding="utf-8").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux /proc/self/io")
def test_the_skip_decision_reads_headers_not_pixels(tmp_path):
    """input_fingerprint reads a few kB of each file whatever its size: counted by the kernel
    (/proc/self/io), so the count holds for ITK's and pydicom's reads alike."""
    rng = np.random.default_rng(0)  # noise: compression cannot make the files small
    image = sitk.GetImageFromArray(rng.integers(-1000, 400, (24, 256, 256)).astype(np.int16))
    folder = tmp_path / "dicom"
    chosen = _series(image, folder, deterministic_uid("chosen"), "a")
    _series(image, folder, deterministic_uid("other"), "b")
    sitk.WriteImage(image, str(tmp_path / "ct.mha"), False)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"), False)
    sitk.WriteImage(image, str(tmp_path / "ct.nii"), False)
    input_fingerprint(folder, deterministic_uid("chosen"))  # imports (pydicom) read files too
    cases = [(folder, deterministic_uid("chosen"), sum(f.stat().st_size for f in chosen))]
    cases += [(tmp_path / n, None, (tmp_path / n).stat().st_size)
              for n in ("ct.mha", "ct.nrrd", "ct.nii")]  # fmt: skip
    for path, uid, size in cases:
        before = _bytes_read()
        _, counted = input_fingerprint(path, uid)
        read = _bytes_read() - before
        assert counted == size, path
        files = len(list(path.iterdir())) if path.is_dir() else 1
        assert size > 3_000_000 and read < size / 10 and read < 100_000 * files, (path, read)


def test_a_files_slice_thickness_comes_from_its_headers_not_its_spacing(tmp_path):
    """A NIfTI file's thickness is the ``SliceThickness`` of its JSON sidecar (as dcm2niix
    writes it), an MHA's or NRRD's the DICOM tag in its header; without either, or with a
    sidecar value that is not a positive number, None (the slice spacing is no thickness).
    Adding a sidecar changes the scan's fingerprint, so ingest reads it again."""
    img = sitk.Image([6, 5, 4], sitk.sitkInt16)
    img.SetSpacing((0.7, 0.7, 1.25))
    nii = tmp_path / "t0.nii.gz"
    write_volume(img, nii)
    assert slice_thickness_of(read_volume(nii)) is None
    before = input_fingerprint(nii)[0]
    side = tmp_path / "t0.json"
    side.write_text('{"SliceThickness": 2.5, "PatientName": "DOE^JANE"}', encoding="utf-8")
    assert slice_thickness_of(read_volume(nii)) == 2.5
    assert input_fingerprint(nii)[0] != before
    for bad in ('{"SliceThickness": "n/a"}', '{"SliceThickness": -1}', "not json", "[2.5]",
                '{"slicethickness": 2.5}'):  # fmt: skip
        side.write_text(bad, encoding="utf-8")
        assert slice_thickness_of(read_volume(nii)) is None, bad
    for name in ("t1.nii", "t1.mha", "t1.nrrd"):
        write_volume(img, tmp_path / name, slice_thickness_mm=3.0)
        assert slice_thickness_of(read_volume(tmp_path / name)) == 3.0, name
    assert (tmp_path / "t1.json").is_file()  # the NIfTI's sidecar
    write_volume(img, tmp_path / "t2.mha")
    assert slice_thickness_of(read_volume(tmp_path / "t2.mha")) is None
