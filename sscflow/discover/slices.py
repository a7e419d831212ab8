"""Slice layout of a DICOM series from its headers: one orientation, uniform positions, no tilt.

Shared by ``sscflow discover`` (which excludes a series that fails) and by ingest (which refuses
to read it): a stack with a missing or duplicated slice, uneven spacing or gantry tilt must never
be read as if its slices were evenly spaced along the slice normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# positions agree when within this many mm (headers carry a few decimals), or this fraction of
# the slice spacing, whichever is larger
POSITION_TOL_MM = 0.02
POSITION_TOL_FRACTION = 0.05
TILT_TOL_DEG = 0.5


class SliceLayoutError(ValueError):
    """The slices of a series do not form one uniform, untilted stack. ``rule`` names the kind
    (``duplicate_position``, ``missing_slice``, ``uneven_spacing``, ``gantry_tilt``,
    ``mixed_orientation``, ``too_few_slices``), ``detail`` says where."""

    def __init__(self, rule: str, detail: str):
        self.rule, self.detail = rule, detail
        super().__init__(detail)


@dataclass(frozen=True)
class SliceLayout:
    n_slices: int
    spacing_mm: float  # between consecutive slice positions, along the normal
    extent_mm: float  # first to last slice position, along the normal
    normal: tuple[float, float, float]  # LPS unit vector (row x column direction)
    axial_angle_deg: float  # between the normal and the body (z) axis


def slice_normal(orientation) -> np.ndarray:
    """Unit normal (row cosine x column cosine) of an ImageOrientationPatient (6 numbers)."""
    o = np.asarray(orientation, dtype=float)
    if o.shape != (6,):
        raise SliceLayoutError(
            "bad_orientation", f"ImageOrientationPatient needs 6 numbers, got {list(o)}"
        )
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if not norm > 0.5:
        raise SliceLayoutError(
            "bad_orientation",
            f"ImageOrientationPatient {list(o)} has parallel row and column directions",
        )
    return n / norm


def check_slice_layout(positions, orientations, *, tilt_deg: float = 0.0) -> SliceLayout:
    """Check that slices form one stack: same orientation, evenly spaced along the normal.

    Parameters
    ----------
    positions : (N, 3) ImagePositionPatient of each slice, mm (LPS), any order
    orientations : (N, 6) ImageOrientationPatient of each slice (or one row of 6 for all)
    tilt_deg : GantryDetectorTilt from the headers (0 when absent)

    Raises
    ------
    SliceLayoutError naming the rule and the positions (mm along the normal) where it fails.

    Examples
    --------
    >>> axial = [1, 0, 0, 0, 1, 0]
    >>> float(check_slice_layout([[0, 0, z] for z in (0, 2.5, 5, 7.5)], axial).spacing_mm)
    2.5
    >>> try:
    ...     check_slice_layout([[0, 0, z] for z in (0, 2.5, 7.5, 10)], axial)
    ... except SliceLayoutError as exc:
    ...     print(exc.rule, "|", exc)
    missing_slice | missing slice: a gap of 5.00 mm between slices at 2.50 and 7.50 mm along the slice normal, where the spacing is 2.50 mm (1 slice missing)
    """  # noqa: E501
    p = np.asarray(positions, dtype=float).reshape(-1, 3)
    o = np.asarray(orientations, dtype=float).reshape(-1, 6)
    if len(p) < 2:
        raise SliceLayoutError("too_few_slices", f"{len(p)} slice; a volume needs at least 2")
    if len(o) > 1 and np.abs(o - o[0]).max() > 1e-3:
        raise SliceLayoutError(
            "mixed_orientation", "slices have different orientations (ImageOrientationPatient)"
        )
    normal = slice_normal(o[0])
    axial = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if abs(tilt_deg) > TILT_TOL_DEG:
        raise SliceLayoutError(
            "gantry_tilt", f"gantry tilt of {tilt_deg:g} degrees (GantryDetectorTilt)"
        )
    d = p @ normal
    order = np.argsort(d, kind="stable")
    d, p = d[order], p[order]
    steps = np.diff(d)
    positive = steps[steps > POSITION_TOL_MM]
    if positive.size == 0:
        raise SliceLayoutError(
            "duplicate_position",
            f"all {len(p)} slices at one position ({d[0]:.2f} mm along the slice normal)",
        )
    spacing = float(np.median(positive))
    tol = max(POSITION_TOL_MM, POSITION_TOL_FRACTION * spacing)
    dup = np.flatnonzero(steps <= tol)
    if dup.size:
        at = ", ".join(f"{d[i]:.2f}" for i in dup[:5])
        raise SliceLayoutError(
            "duplicate_position",
            f"duplicated slice position: {dup.size + 1} "
            f"slices share a position (at {at} mm along the slice normal)",
        )
    gaps = np.flatnonzero(steps > 1.5 * spacing)
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(steps[i] / spacing)) - 1
        more = f"; {gaps.size} gaps in all" if gaps.size > 1 else ""
        raise SliceLayoutError(
            "missing_slice",
            f"missing slice: a gap of {steps[i]:.2f} mm between slices at {d[i]:.2f} and "
            f"{d[i + 1]:.2f} mm along the slice normal, where the spacing is {spacing:.2f} mm "
            f"({missing} slice{'s' if missing != 1 else ''} missing){more}",
        )
    uneven = np.flatnonzero(np.abs(steps - spacing) > tol)
    if uneven.size:
        i = int(uneven[0])
        raise SliceLayoutError(
            "uneven_spacing",
            f"uneven slice spacing: {steps[i]:.2f} mm "
            f"between slices at {d[i]:.2f} and {d[i + 1]:.2f} mm, elsewhere "
            f"{spacing:.2f} mm",
        )
    # the stack must advance along the normal: an offset across it is a tilted gantry
    span = p[-1] - p[0]
    along = float(span @ normal)
    across = float(np.linalg.norm(span - along * normal))
    angle = math.degrees(math.atan2(across, along))
    if angle > TILT_TOL_DEG:
        raise SliceLayoutError(
            "gantry_tilt",
            f"gantry tilt: slices advance {angle:.1f} degrees off their normal (a sheared stack)",
        )
    return SliceLayout(
        n_slices=len(p),
        spacing_mm=spacing,
        extent_mm=float(d[-1] - d[0]),
        normal=tuple(float(v) for v in normal),
        axial_angle_deg=axial,
    )
