import json

import numpy as np
import pytest
import xarray as xr
import zarr

from sscflow import store as st
from sscflow.errors import IncompleteOutputError
from sscflow.geometry import Geometry

GEOM = Geometry((8, 9, 10), (2.0, 1.5, 1.0), (-10.0, 20.0, 5.5))


def test_write_read_round_trip_and_ngff(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    g = st.patient_group(root, "P1")
    data = np.arange(np.prod(GEOM.shape), dtype=np.int16).reshape(GEOM.shape)
    st.write_image(
        g, "baseline", data, GEOM, stage="test", params={"a": 1}, input_hash="h", chunk=4
    )
    img = st.read_image(g, "baseline")
    np.testing.assert_array_equal(img.array[...], data)
    assert img.geometry == GEOM
    assert img.array.chunks == (4, 4, 4)

    # plain zarr sees the NGFF 0.5 metadata: scale = spacing, translation = origin (z, y, x)
    raw = json.loads((tmp_path / "c.zarr/patients/P1/baseline/zarr.json").read_text())
    ms = raw["attributes"]["ome"]["multiscales"][0]
    assert raw["attributes"]["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [2.0, 1.5, 1.0]},
        {"type": "translation", "translation": [-10.0, 20.0, 5.5]},
    ]
    arr_meta = json.loads((tmp_path / "c.zarr/patients/P1/baseline/0/zarr.json").read_text())
    assert arr_meta["zarr_format"] == 3
    assert any(
        c["name"] == "blosc" and c["configuration"]["cname"] == "zstd" for c in arr_meta["codecs"]
    )
    # and xarray opens the array
    ds = xr.open_zarr(tmp_path / "c.zarr/patients/P1/baseline", consolidated=False)
    assert ds["0"].dims == ("z", "y", "x")


def test_lazy_read_is_dask(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    data = np.random.default_rng(0).normal(size=GEOM.shape).astype(np.float32)
    st.write_image(root, "img", data, GEOM, stage="t", params={}, input_hash="h", chunk=4)
    lazy = st.read_image(root, "img", lazy=True).array
    assert hasattr(lazy, "dask") and lazy.chunks[0] == (4, 4)
    np.testing.assert_array_equal(lazy.compute(), data)


def test_incomplete_output_is_never_taken_as_complete(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    data = np.ones(GEOM.shape, np.uint8)
    st.write_image(root, "m", data, GEOM, stage="t", params={}, input_hash="h")
    assert st.output_state(root, "m") == "complete"
    # simulate a crash after the group and array were created but before the completion mark
    meta = dict(root["m"].attrs["sscflow"], complete=False)
    root["m"].attrs["sscflow"] = meta
    assert st.output_state(root, "m") == "incomplete"
    assert not st.is_current(root, "m", "h", {})
    with pytest.raises(IncompleteOutputError, match="incomplete"):
        st.read_image(root, "m")
    # a truncated metadata file (crash mid-write) is incomplete too
    (tmp_path / "c.zarr/m/zarr.json").write_text('{"zarr_format": 3, "node_ty')
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert st.output_state(root, "m") == "incomplete"
    assert st.output_state(root, "absent") == "absent"


def test_is_current_compares_hash_and_params(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    st.write_image(
        root,
        "m",
        np.zeros(GEOM.shape, np.uint8),
        GEOM,
        stage="t",
        params={"spacing": 1.0, "t": (1, 2)},
        input_hash="abc",
    )
    assert st.is_current(root, "m", "abc", {"spacing": 1.0, "t": (1, 2)})
    assert not st.is_current(root, "m", "abd", {"spacing": 1.0, "t": (1, 2)})
    assert not st.is_current(root, "m", "abc", {"spacing": 2.0, "t": (1, 2)})


def test_hash_input_follows_content(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * 100)
    h1 = st.hash_input(a)
    a.write_bytes(b"x" * 99 + b"y")
    assert st.hash_input(a) != h1
    assert st.hash_input(a, "uid1") != st.hash_input(a, "uid2")
    d = tmp_path / "series"
    d.mkdir()
    (d / "1.dcm").write_bytes(b"1")
    (d / "2.dcm").write_bytes(b"2")
    h = st.hash_input(d)
    (d / "2.dcm").write_bytes(b"3")
    assert st.hash_input(d) != h


def test_read_only_missing_store(tmp_path):
    with pytest.raises(IncompleteOutputError, match="does not exist"):
        st.open_store(tmp_path / "none.zarr", mode="r")


def test_only_canonical_geometry_is_stored(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    flipped = Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), ((-1, 0, 0), (0, 1, 0), (0, 0, 1)))
    with pytest.raises(ValueError, match="canonical"):
        st.write_image(
            root, "x", np.zeros((2, 2, 2)), flipped, stage="t", params={}, input_hash="h"
        )


def test_vector_field_has_a_channel_axis(tmp_path):
    root = st.open_store(tmp_path / "c.zarr")
    u = np.random.default_rng(2).normal(size=(3,) + GEOM.shape).astype(np.float32)
    st.write_image(root, "displacement", u, GEOM, stage="t", params={}, input_hash="h", chunk=4)
    img = st.read_image(root, "displacement")
    np.testing.assert_array_equal(img.array[...], u)
    assert img.geometry == GEOM and img.array.chunks == (3, 4, 4, 4)
    ms = root["displacement"].attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 1.5, 1.0]
