"""The baseline chest CT phantom: body, chest wall, lungs with vessels, airways, heart and bones.

Every organ is an analytic shape in an *anatomy frame*: millimetres (z, y, x) relative to
``FOV_CENTRE`` (LPS: z toward Superior, y toward Posterior, x toward patient Left). Shapes are
drawn from a patient's ``anatomy`` stream only, so the same patient has the same anatomy at every
voxel size. Boundaries are rendered with a one-voxel partial-volume ramp from an approximate
signed distance, so a voxel is more than half lung exactly when its centre is inside the lung
truth.

Hounsfield units (before scanner noise): air -1000, subcutaneous fat -100, muscle / mediastinum /
heart / vessels / airway walls 40, lung parenchyma -870 to -835 plus an anterior-to-posterior
gradient of 20-40 HU and a 25 HU (s.d.) texture, ribs and sternum 500, vertebrae 400
(intervertebral discs 100). The lungs stop at least 20 mm short of the first and last slice;
the trachea runs in the midline from the top slice down to the carina.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from sscflow.core.geometry import Geometry

FOV_MM = (300.0, 280.0, 360.0)  # (z, y, x) extent of the scan
FOV_CENTRE = (-160.0, 30.0, 0.0)  # physical (z, y, x) LPS mm of the centre of the scan
HU_AIR, HU_FAT, HU_TISSUE, HU_RIB, HU_SPINE, HU_DISC = -1000.0, -100.0, 40.0, 500.0, 400.0, 100.0
_EPS = 1e-6


def grid_geometry(spacing: float) -> Geometry:
    """The scan grid at ``spacing`` mm isotropic: identity direction, non-zero origin.

    >>> grid_geometry(2.5).shape
    (120, 112, 144)
    """
    shape = tuple(max(2, int(round(f / spacing))) for f in FOV_MM)
    origin = tuple(c - (n - 1) / 2.0 * spacing for c, n in zip(FOV_CENTRE, shape, strict=True))
    return Geometry(shape, (float(spacing),) * 3, origin)


def world_geometry(geometry: Geometry, margin_mm: float = 30.0) -> tuple[Geometry, int]:
    """``geometry`` extended by ``margin_mm`` above and below, and the margin in voxels.

    The phantom is rendered on this larger grid so that the follow-up, which sees anatomy
    from beyond the baseline's first and last slices, shows real anatomy there.
    """
    mz = int(np.ceil(margin_mm / geometry.spacing[0]))
    Z, Y, X = geometry.shape
    origin = (geometry.origin[0] - mz * geometry.spacing[0], *geometry.origin[1:])
    return Geometry((Z + 2 * mz, Y, X), geometry.spacing, origin), mz


def frame_axes(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D anatomy-frame coordinates (mm, float64) of the voxel centres along z, y and x."""
    return tuple(
        o - c + s * np.arange(n)
        for o, c, s, n in zip(
            geometry.origin, FOV_CENTRE, geometry.spacing, geometry.shape, strict=True
        )
    )


def ellipsoid_sd(offsets, semi) -> np.ndarray:
    """First-order signed distance (mm, positive inside) to an axis-aligned ellipsoid.

    ``offsets`` are arrays (broadcastable) of coordinates minus the centre, ``semi`` the
    semi-axes. Exact on the surface to first order: ``(1 - rho) / |grad rho|``.

    >>> round(float(ellipsoid_sd((np.array(7.0), np.array(0.0)), (10.0, 20.0))), 6)
    3.0
    """
    rho2 = sum((o / a) ** 2 for o, a in zip(offsets, semi, strict=True))
    rho = np.sqrt(rho2)
    grad2 = sum((o / a**2) ** 2 for o, a in zip(offsets, semi, strict=True))
    grad = np.sqrt(grad2) / np.maximum(rho, _EPS)
    grad = np.maximum(grad, 1.0 / max(semi))
    return (1.0 - rho) / grad


@dataclass(frozen=True)
class Lung:
    """One lung: side -1 right (x < 0), +1 left. Lengths in mm, anatomy frame."""

    side: int
    yl: float  # centre of the lung's own cylinder / apex ellipsoid
    xl: float
    by: float  # semi-axes of that cylinder
    bx: float
    z_apex: float
    h_apex: float  # height of the apical ellipsoid cap
    z_dome: float  # top of the diaphragm dome under this lung
    h_dome: float  # dome top minus its height at the cylinder edge
    p_post: float  # extra drop of the diaphragm posteriorly
    hu: float  # parenchyma level
    hu_gradient: float  # posterior minus anterior parenchyma HU


@dataclass(frozen=True)
class Anatomy:
    """The analytic shapes of one patient's chest (anatomy frame, mm)."""

    cy: float  # body / thoracic cavity centre (y, x)
    cx: float
    body_ay: float
    body_ax: float
    fat: float
    wall: float
    w0: float  # mediastinal half-width away from the spine
    spine_r: float
    heart_c: tuple[float, float, float]
    heart_semi: tuple[float, float, float]
    trachea_y: float
    trachea_r: float
    carina_z: float
    bronchus_end: tuple[tuple[float, float, float], tuple[float, float, float]]  # right, left
    bronchus_r: tuple[float, float]
    rib_z0: float
    rib_step: float
    rib_drop: float
    lungs: tuple[Lung, Lung] = field(default=())  # right, left

    @property
    def cav_ay(self) -> float:
        return self.body_ay - self.fat - self.wall

    @property
    def cav_ax(self) -> float:
        return self.body_ax - self.fat - self.wall

    @property
    def spine_y(self) -> float:
        return self.cy + self.cav_ay - self.spine_r - 2.0

    @property
    def carina(self) -> np.ndarray:
        return np.array([self.carina_z, self.trachea_y, self.cx])

    def mediastinum_halfwidth(self, y):
        """Half-width (mm) of the mediastinum at AP position y: wider around the spine."""
        return _mediastinum_halfwidth(y, self.w0, self.spine_r, self.spine_y)

    def z_diaphragm(self, lung: Lung, y, x):
        """Height of the diaphragm under ``lung`` and its slope factor sqrt(1 + |grad|^2)."""
        ty, tx = (y - lung.yl) / lung.by, (x - lung.xl) / lung.bx
        q = ty**2 + tx**2
        inner = q < 1.4
        t = np.clip(ty, -1.0, 1.0)
        z = lung.z_dome - lung.h_dome * np.minimum(q, 1.4) - lung.p_post * t
        dzdy = -np.where(inner, 2 * lung.h_dome * ty / lung.by, 0.0)
        dzdy = dzdy - np.where(np.abs(ty) < 1.0, lung.p_post / lung.by, 0.0)
        dzdx = -np.where(inner, 2 * lung.h_dome * tx / lung.bx, 0.0)
        return z, np.sqrt(1.0 + dzdy**2 + dzdx**2)

    def lung_margin(self, lung: Lung, z, y, x) -> np.ndarray:
        """Approximate signed distance (mm, positive inside) to the surface of ``lung``.

        Arrays broadcast; the lung is the thoracic cavity, lateral to the mediastinum, above
        the diaphragm, inside its own cylinder with an apical cap, and outside the heart.
        """
        m = ellipsoid_sd((y - self.cy, x - self.cx), (self.cav_ay, self.cav_ax))
        m = np.minimum(m, lung.side * (x - self.cx) - self.mediastinum_halfwidth(y))
        zd, slope = self.z_diaphragm(lung, y, x)
        m = np.minimum(m, (z - zd) / slope)
        dz = np.maximum(z - (lung.z_apex - lung.h_apex), 0.0)
        m = np.minimum(
            m, ellipsoid_sd((dz, y - lung.yl, x - lung.xl), (lung.h_apex, lung.by, lung.bx))
        )
        hc = self.heart_c
        heart = ellipsoid_sd((z - hc[0], y - hc[1], x - hc[2]), self.heart_semi)
        return np.minimum(m, -heart)

    def lung_box(self, lung: Lung) -> np.ndarray:
        """Rough (2, 3) box [[z, y, x]_low, [z, y, x]_high] of a lung, anatomy frame (mm)."""
        zlo = lung.z_dome - 1.4 * lung.h_dome - lung.p_post
        xs = sorted([self.cx + lung.side * self.w0, self.cx + lung.side * self.cav_ax])
        return np.array(
            [[zlo, self.cy - self.cav_ay, xs[0]], [lung.z_apex, self.cy + self.cav_ay, xs[1]]]
        )

    def airway_capsules(self, top: float) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
        """Airway lumen capsules (start, end, start radius, end radius) up to height ``top``."""
        car = self.carina
        caps = [(car, np.array([top, self.trachea_y, self.cx]), self.trachea_r, self.trachea_r)]
        for end, r in zip(self.bronchus_end, self.bronchus_r, strict=True):
            caps.append((car, np.asarray(end), r, 0.9 * r))
        return caps

    def lung_point_inside(self, lung: Lung, p, margin: float, towards) -> np.ndarray:
        """Move ``p`` in 1 mm steps toward ``towards`` until it is ``margin`` mm inside."""
        p, towards = np.asarray(p, float), np.asarray(towards, float)
        step = towards - p
        step /= max(np.linalg.norm(step), _EPS)
        for _ in range(200):
            if self.lung_margin(lung, *p) >= margin:
                return p
            p = p + step
        return p

    def sink_centre(self, lung: Lung, fy: float, fx: float, above: float) -> np.ndarray:
        """A posterior-basal point: fractions of the lung box in y (from anterior) and x (from
        medial), ``above`` mm over the diaphragm, moved inside the lung by at least 10 mm."""
        (zlo, ylo, xlo), (zhi, yhi, xhi) = self.lung_box(lung)
        y = ylo + fy * (yhi - ylo)
        medial, lateral = (xlo, xhi) if lung.side > 0 else (xhi, xlo)
        x = medial + fx * (lateral - medial)
        z = float(self.z_diaphragm(lung, y, x)[0]) + above
        centre = np.array([0.5 * (zlo + zhi), lung.yl, lung.xl])
        return self.lung_point_inside(lung, (z, y, x), 10.0, centre)

    def lung_centre(self) -> np.ndarray:
        """Middle of the box around both lungs (anatomy frame, mm): the inspiration centre."""
        boxes = np.stack([self.lung_box(lung) for lung in self.lungs])
        return 0.5 * (boxes[:, 0].min(axis=0) + boxes[:, 1].max(axis=0))


def _mediastinum_halfwidth(y, w0, spine_r, spine_y):
    widen = spine_r + 9.0 - w0
    return w0 + widen * np.exp(-(((y - spine_y) / (spine_r + 8.0)) ** 2))


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's chest shapes (sizes and positions vary; shifts up to +-10 mm)."""
    u = rng.uniform
    dz, dy, dx = u(-10, 10), u(-8, 8), u(-5, 5)
    body_ay, body_ax = u(95, 115), u(140, 165)
    fat, wall, w0, spine_r = u(8, 18), u(15, 20), u(14, 17), u(14, 17)
    cy, cx = 5.0 + dy, dx
    cav_ay, cav_ax = body_ay - fat - wall, body_ax - fat - wall
    z_apex = 105.0 + dz + u(-6, 6)
    lungs = []
    for side in (-1, 1):
        big = 1.06 if side < 0 else 1.0  # the right lung is a little wider
        lungs.append(
            Lung(
                side=side,
                yl=cy + u(0, 6),
                xl=cx + side * 0.5 * (w0 + cav_ax),
                by=1.1 * cav_ay,
                bx=big * 0.58 * (cav_ax - w0),
                z_apex=z_apex + u(-4, 4),
                h_apex=u(45, 60),
                z_dome=-40.0 + dz + (8.0 if side < 0 else 0.0) + u(-6, 6),
                h_dome=u(25, 38),
                p_post=u(12, 22),
                hu=u(-870, -835),
                hu_gradient=u(20, 40),
            )
        )
    spine_y = cy + cav_ay - spine_r - 2.0
    trachea_r = u(7.5, 9.0)
    trachea_y = spine_y - spine_r - u(12, 16) - trachea_r
    carina_z = z_apex - u(62, 75)
    ends = []
    for side, drop in ((-1, u(24, 32)), (1, u(18, 24))):
        y_end = trachea_y + u(0, 8)
        width = _mediastinum_halfwidth(y_end, w0, spine_r, spine_y)
        x_end = cx + side * (width + u(10, 16))
        ends.append((carina_z - drop, y_end, x_end))
    heart_semi = (u(42, 50), u(36, 42), u(52, 62))
    heart_c = (lungs[1].z_dome + u(20, 30), cy - 0.45 * cav_ay, cx + u(15, 25))
    return Anatomy(
        cy=cy, cx=cx, body_ay=body_ay, body_ax=body_ax, fat=fat, wall=wall, w0=w0,
        spine_r=spine_r, heart_c=heart_c, heart_semi=heart_semi, trachea_y=trachea_y,
        trachea_r=trachea_r, carina_z=carina_z, bronchus_end=tuple(ends),
        bronchus_r=(u(5.5, 6.5), u(5.0, 6.0)), rib_z0=z_apex + u(0, 8), rib_step=u(20, 24),
        rib_drop=u(35, 50), lungs=tuple(lungs),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Vessel trees


def _segment_distance(p, a, b):
    """Distance from points p (..., 3) to segment a-b and the parameter t in [0, 1]."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), _EPS), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1), t


def _cross(a, b):
    """Cross product of 3-vectors along the last axis (np.cross is slow for tiny arrays)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.stack(
        [
            a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
            a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
            a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0],
        ],
        axis=-1,
    )


def _rotate(v, axis, angle):
    """Rodrigues rotation of unit vector v about unit axes (..., 3) by angles (...)."""
    angle = np.asarray(angle, float)[..., None]
    dot = (axis * v).sum(axis=-1, keepdims=True)
    return v * np.cos(angle) + _cross(axis, v) * np.sin(angle) + axis * dot * (1 - np.cos(angle))


def _perpendicular(d, rng, n=None):
    """Random unit vector(s) perpendicular to d: shape (3,), or (n, 3) when n is given."""
    a = _cross(d, rng.standard_normal(3 if n is None else (n, 3)))
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), _EPS)


def grow_vessels(anatomy: Anatomy, rng: np.random.Generator, max_segments: int = 700):
    """Branching, tapering vessel trees, one per lung, rooted next to the hilum.

    The root (radius ~6 mm) splits into four lobar trunks. Each segment continues as a major
    branch (radius x 0.84-0.94) and gives off a minor one (x 0.62-0.82) at random angles,
    biased away from the root; a segment that would leave the lung is re-aimed up to seven
    times, then the branch stops. Growth is breadth-first, so ``max_segments`` (per lung)
    trims the finest branches evenly.

    Returns
    -------
    list of (start (3,), end (3,), start radius, end radius) in the anatomy frame (mm). Radii
    run from about 6 mm at the root to 1 mm; every segment stays ``radius + 1.5`` mm inside
    its lung and clear of the airway walls.
    """
    airways = anatomy.airway_capsules(top=200.0)
    segments = []
    n_try = 8

    def first_fit(lung, a, ends, ra, rb):
        """Index of the first candidate segment a -> ends[k] that fits, or None."""
        n = max(3, int(np.linalg.norm(ends - a, axis=-1).max() / 2.0) + 2)
        t = np.linspace(0.0, 1.0, n)
        pts = a + t[None, :, None] * (ends[:, None, :] - a)
        r = ra + t * (rb - ra)
        ok = np.all(
            anatomy.lung_margin(lung, pts[..., 0], pts[..., 1], pts[..., 2]) >= r + 1.5, axis=1
        )
        for c0, c1, r0, r1 in airways:
            d, s = _segment_distance(pts, c0, c1)
            ok &= np.all(d >= r0 + s * (r1 - r0) + 2.5 + r, axis=1)
        hits = np.nonzero(ok)[0]
        return int(hits[0]) if hits.size else None

    for lung, hilum in zip(anatomy.lungs, anatomy.bronchus_end, strict=True):
        r0 = rng.uniform(5.5, 6.5)
        offsets = np.array(
            [(-12, -12, 2), (-16, -8, 4), (-10, -16, 6), (-20, -4, 8), (-8, -20, 10)]
        )
        cands = np.asarray(hilum) + offsets * np.array([1.0, 1.0, lung.side])
        fits = [first_fit(lung, c, c[None], r0, r0) is not None for c in cands]
        if not any(fits):
            continue
        root = cands[fits.index(True)]
        segments.append((root, root, r0, r0))
        # the root splits into lobar trunks: upper, anterior-middle, lower-lateral, lower-back
        trunks = [(0.6, 0.0, 0.8), (-0.1, -0.6, 0.8), (-0.6, -0.1, 0.8), (-0.7, 0.35, 0.6)]
        queue = deque(
            (root, np.array([tz, ty, tx * lung.side]), 0.75 * r0) for tz, ty, tx in trunks
        )
        count = 0
        while queue and count < max_segments:
            p, d, r = queue.popleft()
            d = d / np.linalg.norm(d)
            length = r * rng.uniform(3.0, 5.0) + rng.uniform(4.0, 8.0)
            turns = rng.uniform(0.2, 0.7, n_try - 1)
            dirs = np.vstack([d, _rotate(d, _perpendicular(d, rng, n_try - 1), turns)])
            ends = p + dirs * (length * 0.88 ** np.arange(n_try))[:, None]
            r_end = 0.96 * r
            k = first_fit(lung, p, ends, r, r_end)
            if k is None:
                continue
            q, dd = ends[k], dirs[k]
            segments.append((p, q, r, r_end))
            count += 1
            if r_end < 1.1:
                continue
            away = q - root
            away /= max(np.linalg.norm(away), _EPS)
            axis = _perpendicular(dd, rng)
            major = _rotate(dd, axis, rng.uniform(0.15, 0.45)) + 0.25 * away
            minor = _rotate(dd, axis, -rng.uniform(0.45, 0.9)) + 0.25 * away
            queue.append((q, major, max(1.0, r_end * rng.uniform(0.84, 0.94))))
            queue.append((q, minor, max(1.0, r_end * rng.uniform(0.62, 0.82))))
    return segments


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Phantom:
    """A rendered baseline (all arrays (Z, Y, X) on ``geometry``).

    Attributes
    ----------
    hu : float32, clean HU (no disease, no blur, no noise)
    lung : bool, baseline lung truth (voxel centres inside a lung, minus heart and airway
        lumen; vessels and airway walls inside the lungs count as lung)
    parenchyma : float32 in [0, 1], lung fraction minus vessels, airway walls, fibrosis and
        nodules (where density disease may be added)
    sides : uint8, 1 right lung, 2 left lung, 0 elsewhere (the lung truth split)
    disease : the lesions drawn in (a :class:`Disease`), None for a healthy phantom
    emphysema, fibrosis, nodules : bool masks (inside ``lung``) of those lesions
    fibrosis_margin : float32, mm beyond the deep edge of the fibrosis band (<= 0 inside the
        band) in the posterior-basal fibrosis zone, inf elsewhere: where it grows at follow-up
    """

    geometry: Geometry
    anatomy: Anatomy
    hu: np.ndarray
    lung: np.ndarray
    parenchyma: np.ndarray
    sides: np.ndarray | None = None
    disease: Disease | None = None
    emphysema: np.ndarray | None = None
    fibrosis: np.ndarray | None = None
    nodules: np.ndarray | None = None
    fibrosis_margin: np.ndarray | None = None


@dataclass(frozen=True)
class Disease:
    """The lesions of one patient's baseline (anatomy frame, mm; HU).

    ``bullae`` and ``nodules`` are (centre (3,), radius) pairs; ``fibrosis_mm`` is the depth of
    the posterior-basal subpleural fibrosis band per lung (right, left), 0 for none;
    ``emphysema_level`` the fraction of the upper lungs in low-density patches.
    """

    bullae: tuple = ()
    nodules: tuple = ()
    fibrosis_mm: tuple[float, float] = (0.0, 0.0)
    emphysema_level: float = 0.0


HU_EMPHYSEMA, HU_BULLA, HU_CYST = -975.0, -1000.0, -960.0
FIBROSIS_HU = (-500.0, 50.0)  # reticulation range of the fibrosis texture


def draw_disease(anatomy: Anatomy, rng: np.random.Generator) -> Disease:
    """Draw one patient's lesions: emphysema patches, two or three bullae (one against the
    mediastinal pleura next to a hilum), subpleural fibrosis 10-16 mm deep at the posterior
    bases of both lungs, and two or three juxtapleural nodules (radius 4-9 mm)."""
    a = anatomy
    bullae, nodules = [], []
    right, left = a.lungs
    # a bulla at the hilum, against the mediastinum (inside the old 20 mm midline band)
    side = int(rng.integers(2))
    lung, hilum = a.lungs[side], np.asarray(a.bronchus_end[side])
    r = float(rng.uniform(9.0, 12.0))
    start = hilum + np.array([rng.uniform(14, 20), rng.uniform(-16, -10), 0.0])
    start[2] = a.cx + lung.side * (a.w0 + 0.2 * r)
    towards = start + np.array([0.0, 0.0, lung.side * 40.0])
    bullae.append((a.lung_point_inside(lung, start, 0.6 * r, towards), r))
    # apical / anterior subpleural bullae
    for lung in (right, left)[: 1 + int(rng.integers(2))]:
        r = float(rng.uniform(10.0, 16.0))
        z = lung.z_apex - rng.uniform(25, 45)
        y = a.cy - 0.5 * a.cav_ay
        x = lung.xl + lung.side * 0.4 * lung.bx
        centre = np.array([z, lung.yl, lung.xl])
        bullae.append((a.lung_point_inside(lung, (z, y, x), 0.7 * r, centre), r))
    for _ in range(2 + int(rng.integers(2))):
        lung = a.lungs[int(rng.integers(2))]
        (zlo, _, _), (zhi, _, _) = a.lung_box(lung)
        z = float(rng.uniform(zlo + 0.45 * (zhi - zlo), zlo + 0.8 * (zhi - zlo)))
        t = float(rng.uniform(0.15, 0.85)) * np.pi  # 0 = posterior, pi = anterior
        y = a.cy + np.cos(t) * a.cav_ay
        x = a.cx + lung.side * np.sin(t) * a.cav_ax
        r = float(rng.uniform(4.0, 9.0))
        centre = np.array([z, lung.yl, lung.xl])
        nodules.append((a.lung_point_inside(lung, (z, y, x), 0.5 * r, centre), r))
    fib = (float(rng.uniform(10.0, 16.0)), float(rng.uniform(10.0, 16.0)))
    return Disease(tuple(bullae), tuple(nodules), fib, float(rng.uniform(0.04, 0.1)))


def _blend(dst, frac, value):
    """dst = dst * (1 - frac) + value * frac, in place."""
    dst *= 1.0 - frac
    dst += frac * value


def _ramp(sd, h):
    """Partial-volume fraction of a voxel of size h whose centre is sd mm inside a shape."""
    return np.clip(0.5 + sd / h, 0.0, 1.0).astype(np.float32)


def _index_box(geometry, lo, hi, axes):
    """Slices of the voxels whose centres lie in [lo, hi] (anatomy frame) along each axis."""
    out = []
    for a, l_, h_, s in zip(axes, lo, hi, geometry.spacing, strict=True):
        i0 = int(np.searchsorted(a, l_ - s))
        i1 = int(np.searchsorted(a, h_ + s, side="right"))
        out.append(slice(max(i0, 0), min(i1, a.size)))
    return tuple(out)


def _render_capsules(target, capsules, geometry, axes, pad=0.0):
    """Max-composite partial-volume coverage of tapered capsules into ``target`` (in place)."""
    h = geometry.spacing[0]
    for a, b, ra, rb in capsules:
        r_max = max(ra, rb) + pad
        sl = _index_box(geometry, np.minimum(a, b) - r_max, np.maximum(a, b) + r_max, axes)
        if any(s.stop <= s.start for s in sl):
            continue
        zz, yy, xx = np.meshgrid(axes[0][sl[0]], axes[1][sl[1]], axes[2][sl[2]], indexing="ij")
        pts = np.stack([zz, yy, xx], axis=-1)
        d, t = _segment_distance(pts, a, b)
        cover = _ramp(ra + t * (rb - ra) + pad - d, h)
        np.maximum(target[sl], cover, out=target[sl])


def smooth_noise(rng, shape, sigma_vox, dtype=np.float32):
    """Unit-variance Gaussian noise smoothed with a Gaussian of ``sigma_vox`` voxels."""
    noise = rng.standard_normal(shape, dtype=dtype)
    if sigma_vox > 0:
        noise = ndimage.gaussian_filter(noise, sigma_vox, output=dtype, mode="wrap")
        noise /= max(float(noise.std()), _EPS)
    return noise


def render_baseline(
    anatomy: Anatomy,
    vessels,
    geometry: Geometry,
    rng: np.random.Generator,
    *,
    ribs: bool = True,
    disease: Disease | bool | None = True,
) -> Phantom:
    """Voxelise the clean baseline anatomy on ``geometry`` (isotropic spacing).

    ``rng`` draws the lung texture (2 mm correlation, 25 HU s.d.). ``disease``: True draws the
    lesions (:func:`draw_disease`) from a child of ``rng`` (so the texture draws that follow are
    unchanged), a :class:`Disease` renders that one, False or None a healthy phantom. Returns a
    :class:`Phantom`.
    """
    h = geometry.spacing[0]
    z, y, x = axes = frame_axes(geometry)
    Z, Y, X = geometry.shape
    a = anatomy
    y2, x2 = y[:, None], x[None, :]

    # body, fat and muscle: the same in every slice
    body = _ramp(ellipsoid_sd((y2 - a.cy, x2 - a.cx), (a.body_ay, a.body_ax)), h)
    inner = ellipsoid_sd((y2 - a.cy, x2 - a.cx), (a.body_ay - a.fat, a.body_ax - a.fat))
    slab = np.full((Y, X), HU_AIR, np.float32)
    _blend(slab, body, HU_FAT)
    _blend(slab, _ramp(inner, h), HU_TISSUE)
    hu = np.broadcast_to(slab, (Z, Y, X)).copy()

    if ribs:
        _render_bones(hu, a, geometry, axes)

    drng = rng.spawn(1)[0] if disease is True else None
    if disease is True:
        disease = draw_disease(a, drng)
    disease = disease or None
    lung = np.zeros((Z, Y, X), bool)
    sides = np.zeros((Z, Y, X), np.uint8)
    frac = np.zeros((Z, Y, X), np.float32)
    texture = 25.0 * smooth_noise(rng, (Z, Y, X), 2.0 / h)
    for index, lg in enumerate(a.lungs):
        lo, hi = a.lung_box(lg)
        sl = _index_box(geometry, lo - 5.0, hi + 5.0, axes)
        zz, yy, xx = z[sl[0], None, None], y[None, sl[1], None], x[None, None, sl[2]]
        margin = a.lung_margin(lg, zz, yy, xx)
        inside = margin > 0
        f = _ramp(margin, h)
        labels, n = ndimage.label(inside)
        if n > 1:  # slivers (e.g. between heart and diaphragm) become tissue
            keep = np.argmax(np.bincount(labels.ravel())[1:]) + 1
            islands = inside & (labels != keep)
            f[islands] = 0.0
            inside &= ~islands
        ramp_y = np.clip((yy - lg.yl) / lg.by, -1.0, 1.0)
        level = (lg.hu + 0.5 * lg.hu_gradient * ramp_y).astype(np.float32) + texture[sl]
        _blend(hu[sl], f, level)
        lung[sl] |= inside
        sides[sl][inside] = index + 1
        np.maximum(frac[sl], f, out=frac[sl])
    del texture
    lesions = None
    if disease is not None:
        boxes = np.stack([a.lung_box(lg) for lg in a.lungs])
        box = _index_box(geometry, boxes[:, 0].min(axis=0) - 6.0, boxes[:, 1].max(axis=0) + 6.0,
                         axes)  # fmt: skip
        sub_axes = tuple(ax[sl] for ax, sl in zip(axes, box, strict=True))
        parts = _render_disease(hu[box], lung[box], frac[box], a, disease, geometry, sub_axes,
                                drng or rng)  # fmt: skip
        lesions = []
        for part, fill in zip(parts, (False, False, False, 0.0, np.inf), strict=True):
            full = np.full((Z, Y, X), fill, part.dtype)
            full[box] = part
            lesions.append(full)

    vessel = np.zeros((Z, Y, X), np.float32)
    _render_capsules(vessel, vessels, geometry, axes)
    _blend(hu, vessel, HU_TISSUE)

    airways = a.airway_capsules(top=float(z[-1]) + 50.0)
    wall = np.zeros((Z, Y, X), np.float32)
    _render_capsules(wall, airways, geometry, axes, pad=1.5)
    _blend(hu, wall, HU_TISSUE)
    lumen = np.zeros((Z, Y, X), np.float32)
    _render_capsules(lumen, airways, geometry, axes)
    _blend(hu, lumen, HU_AIR)
    lung &= lumen < 0.5  # coverage > 0.5  <=>  centre inside the lumen
    sides[~lung] = 0

    parenchyma = frac
    parenchyma *= 1.0 - vessel
    parenchyma *= 1.0 - wall
    if lesions is None:
        return Phantom(geometry, anatomy, hu, lung, parenchyma, sides)
    emphysema, fibrosis, nodules, solid, margin = lesions
    parenchyma *= 1.0 - solid
    fibrosis &= lung & (vessel < 0.5)
    return Phantom(geometry, anatomy, hu, lung, parenchyma, sides, disease,
                   emphysema & lung, fibrosis, nodules & lung, margin)  # fmt: skip


def _render_disease(hu, lung, frac, a: Anatomy, disease: Disease, geometry, axes, rng):
    """Blend emphysema, bullae, fibrosis and nodules into the lungs (in place, before vessels
    and airways are drawn). Returns (emphysema, fibrosis, nodules) bool masks, the solid-lesion
    fraction (float32) and the subpleural depth of the fibrosis zone (float32, mm)."""
    h = geometry.spacing[0]
    z, y, x = axes
    shape = hu.shape
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    # emphysema: low-density patches in the upper two thirds, weighted to the apices
    (zlo, _, _), (zhi, _, _) = a.lung_box(a.lungs[0])
    upper = np.clip((zz - (zlo + 0.33 * (zhi - zlo))) / 30.0, 0.0, 1.0)
    blobs = smooth_noise(rng, shape, 5.0 / h)
    cut = float(np.quantile(blobs[::3, ::3, ::3], 1.0 - disease.emphysema_level))
    emph = _ramp((blobs - cut) * 8.0, h) * upper.astype(np.float32) * frac
    del blobs
    cover = np.zeros(shape, np.float32)
    for centre, r in disease.bullae:
        sl = _index_box(geometry, np.asarray(centre) - r, np.asarray(centre) + r, axes)
        d = np.sqrt((zz[sl[0]] - centre[0]) ** 2 + (yy[:, sl[1]] - centre[1]) ** 2
                    + (xx[:, :, sl[2]] - centre[2]) ** 2)  # fmt: skip
        np.maximum(cover[sl], _ramp(r - d, h), out=cover[sl])
    cover *= frac
    _blend(hu, emph, HU_EMPHYSEMA)
    _blend(hu, cover, HU_BULLA)
    emphysema = lung & ((emph > 0.5) | (cover > 0.5))
    del emph, cover

    # fibrosis: a subpleural band at the posterior bases, reticular, with honeycomb cysts
    cav = ellipsoid_sd((yy[0] - a.cy, xx[0] - a.cx), (a.cav_ay, a.cav_ax))  # (Y, X)
    depth = np.full(shape, np.inf, np.float32)
    margin = np.full(shape, np.inf, np.float32)
    band = np.zeros(shape, np.float32)
    for lg, dmax in zip(a.lungs, disease.fibrosis_mm, strict=True):
        if dmax <= 0:
            continue
        lo, hi = a.lung_box(lg)
        sl = _index_box(geometry, lo - 5.0, hi + 5.0, axes)
        z_s, y_s, x_s = z[sl[0]][:, None, None], y[sl[1]][None, :, None], x[sl[2]][None, None, :]
        zd, slope = a.z_diaphragm(lg, y_s[0], x_s[0])
        dia = (z_s - zd[None]) / slope[None]
        dep = np.minimum(cav[sl[1], sl[2]][None], dia)
        # the zone: posterior to the lung's centre, up to 45 mm over the dome, tapered
        post = np.clip((y_s - lg.yl) / (0.35 * lg.by), 0.0, 1.0)
        base = np.clip((lg.z_dome + 45.0 - z_s) / 25.0, 0.0, 1.0)
        reach = dmax * post * base
        inside = lung[sl] & (a.lung_margin(lg, z_s, y_s, x_s) > 0)
        zone = inside & (post * base > 0)
        d_here = np.where(zone, dep, np.inf).astype(np.float32)
        depth[sl] = np.minimum(depth[sl], d_here)
        margin[sl] = np.minimum(margin[sl], np.where(zone, dep - reach, np.inf))
        np.maximum(band[sl], _ramp(reach - dep, h) * inside, out=band[sl])
    noise = smooth_noise(rng, shape, 1.2 / h) - smooth_noise(rng, shape, 3.0 / h)
    net = np.exp(-((noise / 0.6) ** 2)).astype(np.float32)  # reticulation: a 1-3 mm net
    patchy = ndtr(smooth_noise(rng, shape, 4.0 / h)).astype(np.float32)  # uniform, 4 mm patches
    level = FIBROSIS_HU[0] + (FIBROSIS_HU[1] - FIBROSIS_HU[0]) * np.maximum(net, patchy)
    cysts = (smooth_noise(rng, shape, 1.5 / h) > 1.5) & (depth < 7.0)
    level = np.where(cysts, HU_CYST, level).astype(np.float32)
    band *= frac
    _blend(hu, band, level)
    fibrosis = lung & (band > 0.5)
    solid = band * (~cysts)
    del noise, net, patchy, level

    # juxtapleural nodules
    nod = np.zeros(shape, np.float32)
    for centre, r in disease.nodules:
        sl = _index_box(geometry, np.asarray(centre) - r, np.asarray(centre) + r, axes)
        d = np.sqrt((zz[sl[0]] - centre[0]) ** 2 + (yy[:, sl[1]] - centre[1]) ** 2
                    + (xx[:, :, sl[2]] - centre[2]) ** 2)  # fmt: skip
        np.maximum(nod[sl], _ramp(r - d, h), out=nod[sl])
    nod *= frac
    _blend(hu, nod, HU_TISSUE)
    nodules = lung & (nod > 0.5)
    np.maximum(solid, nod, out=solid)
    return emphysema, fibrosis, nodules, solid, margin


def _render_bones(hu, a: Anatomy, geometry, axes):
    """Vertebral column, spinous processes, sternum and ribs (all outside the lungs)."""
    h = geometry.spacing[0]
    z, y, x = axes
    y2, x2 = y[:, None], x[None, :]
    # spine: a column with discs every 26 mm, plus the spinous process behind it
    column = _ramp(ellipsoid_sd((y2 - a.spine_y, x2 - a.cx), (a.spine_r, a.spine_r * 1.1)), h)
    process = _ramp(ellipsoid_sd((y2 - (a.spine_y + a.spine_r + 12.0), x2 - a.cx), (11.0, 4.5)), h)
    disc = (np.mod(z - a.rib_z0, 26.0) < 5.0)[:, None, None]
    bone_hu = np.where(disc, HU_DISC, HU_SPINE).astype(np.float32)
    cols = np.nonzero((column > 0).any(axis=0) | (process > 0).any(axis=0))[0]
    rows = np.nonzero((column > 0).any(axis=1) | (process > 0).any(axis=1))[0]
    sl = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    _blend(hu[sl], np.maximum(column, process)[sl[1:]], bone_hu)

    # ribs and sternum live in the chest wall band, outside the thoracic cavity
    cav = ellipsoid_sd((y2 - a.cy, x2 - a.cx), (a.cav_ay, a.cav_ax))
    band = (cav < h) & (cav > -a.wall - h)
    iy, ix = np.nonzero(band)
    depth = -cav[iy, ix]  # mm outside the cavity
    theta = np.arctan2(np.abs(x[ix] - a.cx) / a.cav_ax, (y[iy] - a.cy) / a.cav_ay)  # 0 = back
    t0, t1 = 0.1 * np.pi, 0.78 * np.pi
    s = np.clip((theta - t0) / (t1 - t0), 0.0, 1.0)
    z_offset = a.rib_z0 - a.rib_drop * s**1.3  # ribs descend toward the front
    k = np.clip(np.rint((z_offset[None, :] - z[:, None]) / a.rib_step), 0, 11)
    dz = z[:, None] - (z_offset[None, :] - k * a.rib_step)
    centre = 0.5 * a.wall + 0.5
    e = np.sqrt(((depth[None, :] - centre) / 3.5) ** 2 + (dz / 5.0) ** 2)
    cover = _ramp((1.0 - e) * 3.5, h)
    window = ((theta > t0 - 0.05) & (theta < t1 + 0.05)).astype(np.float32)
    cover *= window[None, :]
    sternum = ellipsoid_sd((y[iy] - (a.cy - a.cav_ay - 0.5 * a.wall), x[ix] - a.cx), (5.0, 14.0))
    lung_z = (z < a.rib_z0 - 20.0) & (z > a.rib_z0 - 11 * a.rib_step)
    cover = np.maximum(cover, _ramp(sternum, h)[None, :] * lung_z[:, None])
    sub = hu[:, iy, ix]
    _blend(sub, cover, HU_RIB)
    hu[:, iy, ix] = sub
