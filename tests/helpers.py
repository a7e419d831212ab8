"""Test helpers: tiny CT-like volumes with known physical geometry."""

from __future__ import annotations

import socket

import numpy as np
import SimpleITK as sitk

from sscflow.config import SegmentConfig

# The mini chest is small, so its lungs are far below the default min_lung_ml.
MINI_SEGMENT = SegmentConfig(min_lung_ml=1.0)


def physical_grid(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical (z, y, x) mm of every voxel centre, each as a (Z, Y, X) array."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    pts = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ d.T
    pts = np.transpose(pts, (2, 1, 0, 3))  # (X, Y, Z, 3) -> (Z, Y, X, 3)
    return pts[..., 2], pts[..., 1], pts[..., 0]


def make_volume(size_xyz, spacing_xyz, origin_xyz, direction=None, *, fill) -> sitk.Image:
    """An int16 image whose voxel values are ``fill(z, y, x)`` of physical coordinates."""
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkInt16)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin_xyz])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction, float).ravel()])
    z, y, x = physical_grid(image)
    values = np.rint(fill(z, y, x)).astype(np.int16)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def mini_chest(center=(0.0, 0.0, 0.0), sphere=None, sphere_hu=1000.0, lung_z_radius=30.0):
    """A fill function: air, an elliptic-cylinder body (40 HU), two ellipsoid lungs (-850 HU),
    and optionally a bright sphere ``(center_zyx, radius)`` in the mediastinum. Anti-aliased by
    supersampling is not needed: tests compare centroids and thresholded volumes."""
    cz, cy, cx = center

    def fill(z, y, x):
        hu = np.full(z.shape, -1000.0)
        body = ((y - cy) / 35.0) ** 2 + ((x - cx) / 50.0) ** 2 <= 1.0
        hu[body] = 40.0
        for side in (-1, 1):
            lung = (
                ((z - cz) / lung_z_radius) ** 2
                + ((y - cy) / 22.0) ** 2
                + ((x - cx - side * 24.0) / 16.0) ** 2
            ) <= 1.0
            hu[lung] = -850.0
        if sphere is not None:
            (sz, sy, sx), r = sphere
            hu[(z - sz) ** 2 + (y - sy) ** 2 + (x - sx) ** 2 <= r * r] = sphere_hu
        return hu

    return fill


def mini_chest_image(**kw) -> sitk.Image:
    """A 1.5 mm mini chest: 40 x 60 x 80 voxels, lungs touching the first and last slice."""
    return make_volume((80, 60, 40), (1.5, 1.5, 1.5), (-60.0, -45.0, -30.0), fill=mini_chest(**kw))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for schedulers and servers started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RETIRED: list = []


def _retire_s3_filesystems() -> None:
    """Take every cached s3fs filesystem out of fsspec's instance cache (see ``moto_s3``)."""
    import s3fs

    _RETIRED.extend(s3fs.S3FileSystem._cache.values())
    s3fs.S3FileSystem.clear_instance_cache()


def moto_s3(monkeypatch, bucket: str = "sscflow-test"):
    """A real S3 API on loopback (moto in server mode, its own process) with an empty bucket,
    as a generator for fixtures: yields ``(s3fs.S3FileSystem(), bucket)``. Credentials and the
    endpoint go into the environment, where s3fs (and every subprocess) finds them.

    fsspec caches filesystem instances per process, each bound to the endpoint it was made
    with; they are taken out of the cache on the way in and out, or a later server's tests
    would reach this one's (by then closed) port. They stay referenced (``_RETIRED``) until
    the interpreter exits, as they would in the cache: zarr's asynchronous instances have no
    finaliser, and collected mid-run their open aiohttp sessions warn."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "sscflow-test",
           "AWS_SECRET_ACCESS_KEY": "sscflow-test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2):
                return True
        except OSError as exc:  # an HTTP error status is an answer
            return isinstance(exc, urllib.error.HTTPError)

    try:
        import s3fs

        _retire_s3_filesystems()
        end = time.monotonic() + 60
        while not answers():
            if time.monotonic() > end:
                raise AssertionError("timed out waiting for the S3 server")
            time.sleep(0.2)
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        yield fs, bucket
    finally:
        _retire_s3_filesystems()
        proc.terminate()
        proc.wait(timeout=20)
