"""Geometry survives every input format and the resampling to the canonical grid."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import make_volume

from sscflow.core.geometry import Geometry, from_itk, to_itk
from sscflow.core.imageio import deterministic_uid, read_volume, write_dicom_series, write_volume
from sscflow.errors import InputImageError, MissingInputError
from sscflow.methods.ingest import to_canonical


def sphere_fraction(center, radius):
    """Fill function: a sphere with a linear partial-volume shell (-1000 outside, +1000 inside)."""

    def fill(z, y, x):
        r = np.sqrt((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2)
        # linear partial volume across a 0.8 mm shell: a good area-preserving approximation
        frac = np.clip((radius - r) / 0.8 + 0.5, 0.0, 1.0)
        return -1000.0 + 2000.0 * frac

    return fill


def rotation_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


GEOMETRIES = {
    "dicom-flipped-x": dict(direction=np.diag([-1.0, 1.0, 1.0]), suffix=None),
    "nifti-flipped-z": dict(direction=np.diag([1.0, 1.0, -1.0]), suffix=".nii.gz"),
    "mha-oblique": dict(direction=rotation_z(12.0), suffix=".mha"),
    "nrrd-identity": dict(direction=np.eye(3), suffix=".nrrd"),
}


def write_any(image, tmp_path, name, suffix):
    if suffix is None:
        folder = tmp_path / name
        write_dicom_series(
            image,
            folder,
            patient_id="X",
            patient_name="TEST^X",
            series_uid=deterministic_uid(name),
            study_uid=deterministic_uid("s"),
        )
        return folder
    path = tmp_path / f"{name}{suffix}"
    write_volume(image, path)
    return path


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_sphere_found_at_the_same_physical_point(tmp_path, name):
    spec = GEOMETRIES[name]
    center = (7.3, -4.1, 5.6)  # z, y, x mm
    spacing_xyz = (0.7, 0.7, 1.25)
    size_xyz = (60, 56, 30)
    # put the volume's centre near the sphere whatever the direction
    d = spec["direction"]
    half = d @ (np.asarray(size_xyz) * np.asarray(spacing_xyz) / 2)
    origin_xyz = np.asarray(center[::-1]) - half
    image = make_volume(size_xyz, spacing_xyz, origin_xyz, d, fill=sphere_fraction(center, 6.0))
    path = write_any(image, tmp_path, name, spec["suffix"])

    hu, geom = to_canonical(read_volume(path), 1.0)
    assert geom.is_canonical and geom.spacing == (1.0, 1.0, 1.0)
    assert hu.dtype == np.int16
    w = np.clip((hu.astype(float) + 1000.0) / 2000.0, 0, 1)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
    centroid_idx = (idx * w[..., None]).sum(axis=(0, 1, 2)) / w.sum()
    found = np.asarray(geom.origin) + centroid_idx * np.asarray(geom.spacing)
    np.testing.assert_allclose(found, center, atol=0.5)  # half a voxel of the 1 mm grid


def test_resampling_preserves_sphere_volume():
    radius = 10.0
    center = (0.0, 0.0, 0.0)
    # y runs anterior-ward (a flipped axis): 17.5 mm down to -16.8 mm
    image = make_volume(
        (50, 50, 26),
        (0.7, 0.7, 1.25),
        (-17.5, 17.5, -16.25),
        np.diag([1.0, -1.0, 1.0]),
        fill=sphere_fraction(center, radius),
    )
    hu, geom = to_canonical(image, 1.0)
    volume = float((hu > 0).sum()) * np.prod(geom.spacing)
    expected = 4.0 / 3.0 * np.pi * radius**3
    assert abs(volume - expected) / expected < 0.02


def test_canonical_input_is_copied_not_interpolated():
    arr = np.random.default_rng(1).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    image = to_itk(arr, Geometry(arr.shape, (2.0, 2.0, 2.0), (1.0, 2.0, 3.0)))
    hu, geom = to_canonical(image, 2.0)
    np.testing.assert_array_equal(hu, arr)
    assert geom.origin == (1.0, 2.0, 3.0)


def test_dicom_readable_by_pydicom_with_geometry(tmp_path):
    image = make_volume((8, 9, 4), (0.7, 0.7, 1.25), (-3, 4, 10), fill=lambda z, y, x: x * 10)
    files = write_dicom_series(
        image,
        tmp_path / "s",
        patient_id="P",
        patient_name="A^B",
        series_uid=deterministic_uid(1),
        study_uid=deterministic_uid(2),
    )
    ds = pydicom.dcmread(files[2])
    assert ds.Modality == "CT"
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-3, 4, 12.5])
    np.testing.assert_array_equal(
        ds.pixel_array * ds.RescaleSlope + ds.RescaleIntercept, sitk.GetArrayFromImage(image)[2]
    )


def test_read_errors(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        read_volume(tmp_path / "none.nii.gz")
    bad = tmp_path / "trunc.nii.gz"
    g = Geometry((10, 10, 10), (1, 1, 1), (0, 0, 0))
    write_volume(to_itk(np.zeros(g.shape, np.int16), g), bad)
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(InputImageError, match="could not be read"):
        read_volume(bad)
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image(10, 10, sitk.sitkInt16), str(flat))
    with pytest.raises(InputImageError, match="has 2 dimensions"):
        read_volume(flat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputImageError, match="holds no DICOM series"):
        read_volume(tmp_path / "empty")
    with pytest.raises(InputImageError, match="unknown image format"):
        (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
        read_volume(tmp_path / "x.txt")


def test_several_series_need_a_uid(tmp_path):
    folder = tmp_path / "two"
    a = make_volume((6, 6, 3), (1, 1, 1), (0, 0, 0), fill=lambda z, y, x: x)
    b = make_volume((6, 6, 3), (1, 1, 1), (0, 0, 0), fill=lambda z, y, x: y)
    ua, ub = deterministic_uid("a"), deterministic_uid("b")
    for img, uid in ((a, ua), (b, ub)):
        write_dicom_series(
            img,
            folder / uid[-6:],
            patient_id="P",
            patient_name="N",
            series_uid=uid,
            study_uid=deterministic_uid("s"),
        )
    for sub in list(folder.iterdir()):  # both series in one folder
        for f in sub.iterdir():
            f.rename(folder / f"{sub.name}_{f.name}")
        sub.rmdir()
    with pytest.raises(InputImageError, match="holds 2 DICOM series; give the one"):
        read_volume(folder)
    got = read_volume(folder, series_uid=ub)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(b))
    with pytest.raises(InputImageError, match="has no DICOM series with the SeriesInstanceUID"):
        read_volume(folder, series_uid="1.2.3")


def test_field_conversion_round_trip():
    u = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    img = to_itk(u, Geometry((4, 5, 6), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0)))
    # ITK's first component is x: our component 2
    np.testing.assert_allclose(img[1, 2, 3][0], u[2, 3, 2, 1])
    field, geometry = from_itk(img)
    np.testing.assert_array_equal(field, u)
    assert geometry.spacing == (1.0, 2.0, 3.0) and geometry.shape == (4, 5, 6)
