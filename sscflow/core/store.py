"""The cohort store (contract): one Zarr v3 group per cohort, readable by plain zarr and xarray.

Layout::

    STORE/                          zarr.json: {"sscflow": {"layout": 1, ...}}
      patients/<patient_id>/        zarr.json: {"sscflow": {"clinical": {...}}}
        baseline/                   an OME-NGFF 0.5 image group
          zarr.json                 {"ome": {"version": "0.5", "multiscales": [...]},
                                     "sscflow": {"stage", "params", "input_hash", "complete", ...}}
          0/                        the full-resolution array (z, y, x), Blosc-zstd chunks
        followup/  lung_mask/  followup_lung_mask/ ...

Each image group carries its spacing and origin as the NGFF ``scale`` and ``translation`` of
level "0" (z, y, x, millimetres; the translation is the physical position of voxel 0). An output is
complete only when ``sscflow.complete`` is true; that attribute is written last, so an interrupted
write never looks complete.

Fields and maps are stored with a bounded error (``step`` of :func:`write_image`): each value is
rounded to the nearest multiple of a power of two, so it stays a plain float32 that any Zarr
reader opens, NaN stays NaN, and the zero low mantissa bits compress (Blosc-zstd with byte
shuffle). The steps, recorded in each group's ``sscflow.quantisation``:

- displacement fields: :func:`displacement_step`, the largest power of two <= spacing / 2048 mm
  (2^-11 mm at 1 mm, 2^-10 at 2 mm); the error is half a step (<= 0.00025 mm at 1 mm, far
  inside 0.01 mm), small enough that the log-Jacobian computed from the stored field is within
  0.0008 of the one from the full-precision field (about 1.5 step / spacing, measured on the
  real CT's planted pairs, ``benchmarks/store_size.py``);
- fields no map is derived from (the template field; the template-space map is the patient's
  map carried over): ``FIELD_STEP_MM`` 2^-6 mm, error <= 0.0078 mm (the 0.01 mm bound);
- log-Jacobian maps: ``LOG_JACOBIAN_STEP`` 2^-12 (error <= 0.00013), so a stored map is within
  0.001 of the map of the full-precision field (0.0008 + 0.00013).

Vector fields (``(c, z, y, x)`` with a ``step``, no NaN) go one step further: they are stored as
int32 multiples of the step, each chunk delta-coded (numcodecs' ``fixedscaleoffset`` and
``delta`` filters before Blosc-zstd). A smooth field's neighbours differ by a few steps, so the
differences compress to less than half of the rounded floats (real CT at 2 mm, a moved pair:
0.93 bytes per voxel instead of 2.22). Readers still get float32 in millimetres, with the same
error bound; they need zarr-python (or another reader with numcodecs): these two filters are not
in the Zarr v3 specification.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.errors import ZarrUserWarning

from sscflow.core.geometry import Geometry
from sscflow.errors import IncompleteOutputError

LAYOUT_VERSION = 1
PATIENTS = "patients"
TEMPLATE = "template"
NGFF_VERSION = "0.5"
LOG_JACOBIAN_STEP = 2.0**-12  # stored log-Jacobian maps: error <= 2^-13 (see the module notes)
FIELD_STEP_MM = 2.0**-6  # a field no map is computed from: error <= 0.0078 mm
# the delta-coded fields' filters are numcodecs codecs, which zarr flags each time one is made
NUMCODECS_WARNING = "Numcodecs codecs are not in the Zarr version 3 specification"
warnings.filterwarnings("ignore", message=NUMCODECS_WARNING, category=ZarrUserWarning)


def displacement_step(spacing) -> float:
    """The storage step (mm) of a displacement field on a grid of ``spacing`` (mm): the largest
    power of two <= min(spacing) / 2048.

    >>> displacement_step((1.0, 1.0, 1.0)) == 2**-11, displacement_step((2.5, 2.0, 2.0)) == 2**-10
    (True, True)
    """
    return 2.0 ** math.floor(math.log2(min(float(s) for s in spacing) / 2048))


def quantise(data, step: float):
    """``data`` rounded to the nearest multiple of ``step`` (a power of two), float32; NaN stays
    NaN; numpy or dask. The error is at most ``step / 2``.

    >>> quantise(np.array([0.1, -1.3, np.nan], np.float32), 0.25).tolist()
    [0.0, -1.25, nan]
    """
    if step <= 0 or 2.0 ** round(math.log2(step)) != step:
        raise ValueError(f"quantise: step must be a positive power of two, got {step}")
    inv = np.float32(1 / step)
    return (np.round(data * inv) * np.float32(step)).astype(np.float32)


def open_store(path: str | os.PathLike, mode: Literal["r", "a"] = "a") -> zarr.Group:
    """Open (or with mode 'a', create) a cohort store and return its root group."""
    if mode == "r" and not _exists(path):
        raise IncompleteOutputError(f"store {path} does not exist")
    root = zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
    if mode != "r" and "sscflow" not in root.attrs:
        root.attrs["sscflow"] = {"layout": LAYOUT_VERSION, "kind": "cohort"}
    return root


def _exists(path) -> bool:
    """Whether a store (a folder, or an fsspec URL such as s3://bucket/cohort.zarr) exists."""
    if is_url(path):
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(str(path), **storage_options(path))
        return fs.exists(f"{root.rstrip('/')}/zarr.json")
    return Path(path, "zarr.json").exists()


def storage_options(path: str | os.PathLike) -> dict:
    """fsspec options for a store URL. Object stores' directory listings are not cached: other
    processes (the workers) add what this one lists, and a cached listing would hide it."""
    if str(path).split("://", 1)[0] in ("s3", "s3a", "gs", "gcs"):
        return {"use_listings_cache": False}
    return {}


def zarr_store(path: str | os.PathLike, *, read_only: bool = False):
    """What zarr (and xarray) should open for a store path: the folder's path, or for a URL an
    fsspec store with :func:`storage_options`."""
    if not is_url(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=storage_options(path),
                                read_only=read_only)  # fmt: skip


def is_url(path: str | os.PathLike) -> bool:
    """Whether a store path is an fsspec URL (s3://, gs://, memory://, ...) rather than a folder."""
    return "://" in str(path)


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``parent[name]``, created if absent; safe when workers race to create it (on object
    storage the loser of the race sees the winner's group, not an error)."""
    try:
        return parent.require_group(name)
    except zarr.errors.ContainsGroupError:
        return parent[name]


def patient_group(root: zarr.Group, patient_id: str, *, create: bool = True) -> zarr.Group:
    """The group ``patients/<patient_id>``; created if needed unless ``create`` is False."""
    if create:
        return require_group(require_group(root, PATIENTS), patient_id)
    try:
        return root[f"{PATIENTS}/{patient_id}"]
    except KeyError:
        raise IncompleteOutputError(f"patient {patient_id} is not in the store") from None


def template_group(root: zarr.Group) -> zarr.Group:
    """The group ``template`` (image and lung mask of the common space).

    Raises IncompleteOutputError when the template stage has not run.
    """
    try:
        return root[TEMPLATE]
    except KeyError:
        raise IncompleteOutputError(
            f"the store has no {TEMPLATE} group; run the template stage first"
        ) from None


PAIRS = "pairs"  # patients/<id>/pairs/<t0>-<t1>: a patient's pairs other than 0 -> 1


def unit_groups(parent: zarr.Group) -> list[tuple[str, zarr.Group]]:
    """The unit groups under ``parent`` (``STORE/patients`` or ``STORE/status``), sorted by id:
    ``<patient_id>`` (the pair 0 -> 1, or a patient's records) and ``<patient_id>/pairs/<t0>-<t1>``
    (``sscflow.cohort.unit_id``). A patient group holding nothing but ``pairs`` (no pair 0 -> 1
    was registered) is not a unit itself."""
    out = []
    for name, group in subgroups(parent):
        members = [n for n, _ in subgroups(group, arrays=True)] if PAIRS in group else None
        if members is None or set(members) != {PAIRS} or len(group.attrs):
            out.append((name, group))
        if members is not None:
            out += [(f"{name}/{PAIRS}/{n}", g) for n, g in subgroups(group[PAIRS])]
    return sorted(out, key=lambda kv: kv[0])


def subgroups(group: zarr.Group, *, arrays: bool = False) -> list[tuple[str, Any]]:
    """``group.groups()`` (with ``arrays``: ``group.members()``), quietly: a member another
    worker is creating while this one lists (its folder made, its metadata not yet written) is
    left out, without zarr's warning on the console ("Object at 1-2 is not recognized as a
    component of a Zarr hierarchy")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZarrUserWarning)
        return list(group.members() if arrays else group.groups())


def patient_ids(root: zarr.Group) -> list[str]:
    """The unit ids (patients, and their pairs other than 0 -> 1) present in the store, sorted."""
    if PATIENTS not in root:
        return []
    return [name for name, _ in unit_groups(root[PATIENTS])]


def ngff_multiscales(name: str, geometry: Geometry, *, channels: bool = False) -> dict:
    """OME-NGFF 0.5 ``ome`` attribute for a single-level (z, y, x) image in millimetres.

    With ``channels`` the array is (c, z, y, x), e.g. a displacement field's three components.
    """
    if not geometry.is_canonical:
        raise ValueError(
            f"{name}: only canonical (identity direction) grids are stored; resample first"
        )
    axes = [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]
    scale, translation = list(geometry.spacing), list(geometry.origin)
    if channels:
        axes = [{"name": "c", "type": "channel"}] + axes
        scale, translation = [1.0] + scale, [0.0] + translation
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": scale},
                            {"type": "translation", "translation": translation},
                        ],
                    }
                ],
            }
        ],
    }


def write_image(
    parent: zarr.Group,
    name: str,
    data,
    geometry: Geometry,
    *,
    stage: str,
    params: dict,
    input_hash: str,
    extra: dict | None = None,
    chunk: int = 64,
    compression_level: int = 3,
    fill_value: Any = 0,
    complete: bool = True,
    label_of: str | None = None,
    step: float | None = None,
) -> zarr.Group:
    """Write ``data`` (numpy or dask, (z, y, x) or (c, z, y, x)) as an NGFF image group.

    Any existing group ``name`` is replaced. The group is marked complete last; with
    ``complete=False`` it is left incomplete for the caller to add what it derives from the
    stored data and then call :func:`finish_image`. With ``label_of`` (the name of a sibling
    image, e.g. "baseline") the group is an OME-NGFF ``image-label`` of that image (a mask:
    napari opens it as a labels layer). With ``step`` (a power of two) float data is stored
    rounded to it (:func:`quantise`; error <= step / 2, recorded in ``sscflow.quantisation``).
    """
    if tuple(data.shape[-3:]) != geometry.shape:
        raise ValueError(
            f"{name}: data shape {data.shape} does not match geometry {geometry.shape}"
        )
    group = parent.create_group(name, overwrite=True)  # drops an old, maybe complete, version
    meta = {
        "stage": stage,
        "params": _jsonable(params),
        "input_hash": input_hash,
        "geometry": geometry.to_dict(),
        "complete": False,
        **_jsonable(extra or {}),
    }
    filters = ()
    if step is not None:
        data = quantise(data, step)
        meta["quantisation"] = {"step": step, "max_abs_error": step / 2}
        if data.ndim == 4 and isinstance(data, np.ndarray) and not np.isnan(data).any():
            filters = _delta_coded(step)
            meta["quantisation"]["coding"] = "int32 multiples of step, delta-coded per chunk"
    if data.ndim not in (3, 4):
        raise ValueError(f"{name}: data must be (z, y, x) or (c, z, y, x), got shape {data.shape}")
    ome = ngff_multiscales(name, geometry, channels=data.ndim == 4)
    if label_of is not None:
        ome["image-label"] = {"colors": [{"label-value": 1, "rgba": [255, 204, 0, 255]}],
                              "properties": [{"label-value": 1, "name": "lung"}],
                              "source": {"image": f"../{label_of}"}}  # fmt: skip
    group.attrs.update({"ome": ome, "sscflow": meta})
    dtype = np.dtype(data.dtype)
    chunks = tuple(min(chunk, s) for s in data.shape[-3:])
    chunks = tuple(data.shape[:-3]) + chunks
    shuffle = BloscShuffle.bitshuffle if dtype.itemsize == 1 else BloscShuffle.shuffle
    arr = group.create_array(
        "0",
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        filters=filters,
        compressors=[BloscCodec(cname="zstd", clevel=compression_level, shuffle=shuffle)],
        fill_value=fill_value,
        dimension_names=(["c"] if data.ndim == 4 else []) + ["z", "y", "x"],
    )
    if hasattr(data, "dask"):
        data.rechunk(chunks).store(arr, lock=False)
    else:
        arr[...] = np.asarray(data)
    if complete:
        finish_image(parent, name)
    return group


def sibling_units(root: zarr.Group, unit: str) -> list[str]:
    """The other pairs of ``unit``'s patient in the store (``<pid>`` and
    ``<pid>/pairs/<t0>-<t1>``), ``<pid>`` first: where a scan, its masks or its template field
    may already have been made from the same inputs."""
    pid = unit.split("/", 1)[0]
    try:
        patient = root[f"{PATIENTS}/{pid}"]
    except KeyError:
        return []
    units = [pid] + ([f"{pid}/{PAIRS}/{n}" for n, _ in sorted(subgroups(patient[PAIRS]))]
                     if PAIRS in patient else [])  # fmt: skip
    return [u for u in units if u != unit]


def copy_image(src: zarr.Group, src_name: str, dst: zarr.Group, dst_name: str, *,
               extra: dict | None = None, label_of: str | None = None, chunk: int = 64,
               compression_level: int = 3, fill_value: Any = 0) -> None:  # fmt: skip
    """Write the complete image ``src/src_name`` as ``dst/dst_name``: the same voxels, geometry,
    stage, parameters and input hash (so it is current wherever the original is), its record
    updated with ``extra`` (e.g. ``{"reused_from": unit}``). Quantised data is copied as it is
    (already multiples of its step)."""
    image = read_image(src, src_name)
    meta = dict(image.meta)
    keep = {k: v for k, v in meta.items()
            if k not in ("stage", "params", "input_hash", "geometry", "complete")}  # fmt: skip
    write_image(dst, dst_name, image.array[...], stored_geometry(image), stage=meta["stage"],
                params=meta["params"], input_hash=meta["input_hash"],
                extra={**keep, **(extra or {})}, chunk=chunk,
                compression_level=compression_level, fill_value=fill_value,
                label_of=label_of)  # fmt: skip


def _delta_coded(step: float) -> tuple:
    """Filters that store float32 multiples of ``step`` as delta-coded int32 (exact: the
    multiples are integers)."""
    from zarr.codecs.numcodecs import Delta, FixedScaleOffset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NUMCODECS_WARNING, category=ZarrUserWarning)
        return (FixedScaleOffset(offset=0, scale=1 / step, dtype="<f4", astype="<i4"),
                Delta(dtype="<i4"))  # fmt: skip


def finish_image(parent: zarr.Group, name: str, extra: dict | None = None) -> None:
    """Add ``extra`` to an image group's ``sscflow`` attribute and mark it complete, in one
    metadata write (atomic on a local store): the completion mark is always written last."""
    group = parent[name]
    meta = {**dict(group.attrs["sscflow"]), **_jsonable(extra or {}), "complete": True}
    group.attrs["sscflow"] = meta


@dataclass(frozen=True)
class StoredImage:
    array: Any  # zarr.Array, or a dask array when read lazily
    geometry: Geometry
    meta: dict


def stored_geometry(image: StoredImage) -> Geometry:
    """The geometry of a stored image: NGFF scale and translation, direction from ``sscflow``."""
    direction = (image.meta.get("geometry") or {}).get("direction")
    g = image.geometry
    return Geometry(g.shape, g.spacing, g.origin, tuple(map(tuple, direction))) if direction else g


def read_image(parent: zarr.Group, name: str, *, lazy: bool = False) -> StoredImage:
    """Open a complete image group. ``lazy`` returns a dask array chunked like the store.

    Raises IncompleteOutputError if the group is absent or was never completed.
    """
    state = output_state(parent, name)
    if state != "complete":
        raise IncompleteOutputError(f"{parent.path}/{name} is {state}")
    group = parent[name]
    meta = dict(group.attrs["sscflow"])
    ms = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    arr = group["0"]
    geometry = Geometry(
        tuple(arr.shape[-3:]), tuple(ms[0]["scale"][-3:]), tuple(ms[1]["translation"][-3:])
    )
    if lazy:
        import dask.array as da

        arr = da.from_zarr(arr)
    return StoredImage(arr, geometry, meta)


def output_state(parent: zarr.Group, name: str) -> Literal["absent", "incomplete", "complete"]:
    """Whether ``parent/name`` is absent, started but not complete, or complete."""
    try:
        group = parent[name]
    except KeyError:
        return "absent"
    except (ValueError, json.JSONDecodeError, OSError):
        return "incomplete"  # unreadable metadata: an interrupted write
    meta = group.attrs.get("sscflow", {})
    if not isinstance(meta, dict) or meta.get("complete") is not True or "0" not in group:
        return "incomplete"
    return "complete"


def is_current(parent: zarr.Group, name: str, input_hash: str, params: dict) -> bool:
    """True when ``parent/name`` is complete and was made from these inputs and parameters."""
    if output_state(parent, name) != "complete":
        return False
    meta = parent[name].attrs["sscflow"]
    return meta.get("input_hash") == input_hash and meta.get("params") == _jsonable(params)


def hash_input(path: str | os.PathLike, *extra: str) -> str:
    """sha256 of a file's bytes, or of every file in a folder (names and bytes, sorted).

    ``extra`` strings (a series UID, say) are mixed in.
    """
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():  # a renamed single file keeps its hash; a reordered series does not
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    for e in extra:
        h.update(str(e).encode())
    return h.hexdigest()


def hash_values(*values: Any) -> str:
    """sha256 of JSON-serialised values (parameters, upstream hashes)."""
    text = json.dumps(_jsonable(list(values)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(obj):
    """Plain JSON types, so attributes compare equal after a round trip through zarr.json."""
    return json.loads(json.dumps(obj, default=_default, sort_keys=True))


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --- the resume rule every stage shares: read the inputs, hash them, skip a current output


def read_inputs(parent: zarr.Group, names, who: str, fix: str, *,
                lazy: bool = False) -> dict[str, StoredImage]:  # fmt: skip
    """The complete images ``parent/<name>`` for each name, in order.

    Raises IncompleteOutputError naming ``who`` (``"patient P1"``) and what to run first
    (``fix``) for the first one that is absent or incomplete.
    """
    out = {}
    for name in names:
        try:
            out[name] = read_image(parent, name, lazy=lazy)
        except IncompleteOutputError as exc:
            raise IncompleteOutputError(f"{who}: {exc}; {fix}") from None
    return out


def upstream_hash(inputs, *extra: Any) -> str:
    """The input hash of an output: each input's own input hash and parameters, in order, then
    ``extra``. ``inputs`` are StoredImages or their ``sscflow`` attributes (dicts)."""
    parts = []
    for item in inputs:
        meta = item.meta if isinstance(item, StoredImage) else dict(item or {})
        parts += [meta.get("input_hash"), meta.get("params")]
    return hash_values(*parts, *extra)


def stored_record(parent: zarr.Group, name: str) -> dict | None:
    """The ``sscflow`` attribute of a complete output ``parent/name`` (an image, or a group that
    records a stage's output), or None when it is absent or incomplete."""
    try:
        group = parent[name]
        meta = dict(group.attrs.get("sscflow", {}) or {})
    except (KeyError, ValueError, json.JSONDecodeError, OSError):
        return None
    if meta.get("complete") is not True or ("ome" in group.attrs and "0" not in group):
        return None
    return meta


def current_record(parent: zarr.Group, names, input_hash: str, params: dict) -> dict | None:
    """The record of the last of ``names`` when every one is complete and was made from these
    inputs and parameters (the output may be skipped), else None."""
    meta = None
    want = _jsonable(params)
    for name in names:
        meta = stored_record(parent, name)
        if meta is None or meta.get("input_hash") != input_hash or meta.get("params") != want:
            return None
    return meta


def write_record(parent: zarr.Group, name: str, *, stage: str, params: dict, input_hash: str,
                 extra: dict | None = None) -> None:  # fmt: skip
    """Record a stage's output that lives outside the store (a results file) as the complete
    group ``parent/name``: the same record an image carries, so the same rule resumes it."""
    group = require_group(parent, name)
    group.attrs["sscflow"] = {"stage": stage, "params": _jsonable(params),
                              "input_hash": input_hash, **_jsonable(extra or {}),
                              "complete": True}  # fmt: skip


def drop_record(parent: zarr.Group, name: str) -> None:
    """Mark ``parent/name``'s record incomplete (before its output is rewritten)."""
    meta = stored_record(parent, name)
    if meta is not None:
        parent[name].attrs["sscflow"] = {**meta, "complete": False}
