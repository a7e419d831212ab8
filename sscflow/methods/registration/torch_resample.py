"""The follow-up onto the baseline grid, the common blur and the composition of the maps, in
torch on the registration's device.

``sscflow.methods.registration.register`` uses these when the torch backend runs on CUDA, so that a
pair goes to the device once (the two volumes) and comes back once (the displacement); on CPU
it keeps SimpleITK and scipy, which these functions reproduce:

- :func:`resample`: SimpleITK's ``Resample`` with ``sitkBSpline`` (cubic B-spline, mirror
  boundary) or ``sitkLinear``, through a map ``y = matrix @ x + offset`` (physical zyx mm), any
  follow-up direction; ``fill`` outside the follow-up's extent (its first and last voxel centres
  widened by half a voxel, as ITK's), and the validity map (1 inside, 0 outside) that ``Resample``
  of an image of ones gives;
- :func:`gaussian_blur`: ``scipy.ndimage.gaussian_filter(mode="nearest")`` (radius 4 s.d.);
- :func:`compose`: ``u(x) = R(A(x + w(x))) - x``, the rigid map R after the backend's affine A
  and its deformable part w.

Cubic B-spline interpolation is the volume's B-spline coefficients (the inverse of the
sampled cubic B-spline, a symmetric filter with taps ``z^|k|``, ``z = sqrt(3) - 2``, applied as
a 31-tap separable filter on the mirrored volume: the neglected tail is below 1e-8 of the
signal) read at each point as eight trilinear lookups (the 4 x 4 x 4 cubic weights factor per
axis into two linear interpolations each, at shifted positions).
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from sscflow.core.geometry import Geometry

__all__ = ["compose", "correlate_nearest", "gaussian_blur", "index_map", "resample",
           "to_device", "warm_up"]

_POLE = math.sqrt(3.0) - 2.0
_TAPS = 15  # per side: |z|^16 ~ 7e-10
_SLAB_POINTS = 1 << 21  # points per resampling slab: its temporaries stay near 250 MB
_WARM: dict[str, float] = {}  # device -> seconds its warm-up took (once per process)
# one warm-up at a time: a GPU worker runs several pairs in threads, and CUDA loads its linear
# algebra library lazily on the first call, which fails when two threads make that call at once
# ("lazy wrapper should be called at most once", seen on an H200 with 3 pairs per GPU)
_WARM_LOCK = threading.Lock()


def to_device(array, device):
    """A float32 (Z, Y, X) tensor on ``device`` (one copy)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def _mirror_index(n: int, pad: int, device):
    """Indices of a length-``n`` axis extended by ``pad`` on each side, mirrored about the
    first and last samples (c[-k] = c[k]), as many times as it takes."""
    import torch

    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _taps() -> list[float]:
    gain = -6.0 * _POLE / (1.0 - _POLE * _POLE)
    return [gain * _POLE ** abs(k) for k in range(-_TAPS, _TAPS + 1)]


def _correlate(x, dim: int, taps):
    """'valid' correlation of ``x`` along ``dim`` with the 1-D ``taps`` (floats)."""
    n = x.shape[dim] - len(taps) + 1
    acc = x.narrow(dim, 0, n) * taps[0]
    for i in range(1, len(taps)):
        acc.add_(x.narrow(dim, i, n), alpha=taps[i])
    return acc


def bspline_coefficients(volume):
    """Cubic B-spline coefficients of a (Z, Y, X) float tensor, mirror boundary (ITK's)."""
    taps = _taps()
    out = volume
    for dim in range(3):
        idx = _mirror_index(out.shape[dim], _TAPS, out.device)
        out = _correlate(out.index_select(dim, idx), dim, taps)
    return out


def index_map(moving_geometry: Geometry, fixed_geometry: Geometry, matrix, offset):
    """(M, b), float64: the follow-up's continuous index (zyx) of baseline voxel i is M i + b."""
    f = fixed_geometry
    d = np.asarray(moving_geometry.direction, float)[::-1, ::-1]  # zyx
    inv = np.linalg.inv(d * np.asarray(moving_geometry.spacing, float)[None, :])
    fd = np.asarray(f.direction, float)[::-1, ::-1] * np.asarray(f.spacing, float)[None, :]
    r = np.asarray(matrix, float)
    t = np.asarray(offset, float)
    m = inv @ r @ fd
    b = inv @ (r @ np.asarray(f.origin, float) + t - np.asarray(moving_geometry.origin, float))
    return m, b


def resample(moving, moving_geometry: Geometry, fixed_geometry: Geometry, matrix, offset, *,
             cubic: bool = True, fill: float = -1024.0, coefficients=None):  # fmt: skip
    """The follow-up at ``matrix @ x + offset`` for every baseline voxel x, and where that
    point was imaged: two float32 (Z, Y, X) tensors on ``moving``'s device.

    ``moving`` is the follow-up (a (Z, Y, X) tensor on its own grid ``moving_geometry``);
    ``coefficients``, when given, are its cubic B-spline coefficients (computed here
    otherwise). ``cubic`` False: linear interpolation.
    """
    import torch

    F = torch.nn.functional
    dev = moving.device
    src = moving
    if cubic:
        src = bspline_coefficients(moving) if coefficients is None else coefficients
    src = src[None, None].float()
    shape = fixed_geometry.shape
    n = np.asarray(moving_geometry.shape, float)
    m, b = index_map(moving_geometry, fixed_geometry, matrix, offset)
    m_t = torch.tensor(m, dtype=torch.float64, device=dev)
    b_t = torch.tensor(b, dtype=torch.float64, device=dev)
    n_t = torch.tensor(n, dtype=torch.float64, device=dev)
    norm = 2.0 / torch.clamp(n_t - 1.0, min=1.0)  # index -> grid_sample's [-1, 1]
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    valid = torch.empty(shape, dtype=torch.float32, device=dev)
    yx = [torch.arange(k, dtype=torch.float64, device=dev) for k in shape[1:]]
    step = max(1, _SLAB_POINTS // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        zz = torch.arange(z0, z1, dtype=torch.float64, device=dev)
        grid = torch.stack(torch.meshgrid(zz, *yx, indexing="ij"), dim=-1)  # (z, y, x, 3)
        ci = grid @ m_t.T + b_t  # follow-up continuous index, zyx
        del grid
        inside = ((ci >= -0.5) & (ci < n_t - 0.5)).all(dim=-1)
        if cubic:
            value = _cubic(F, src, ci, norm)
        else:
            g = (ci * norm - 1.0).flip(-1).float()[None]
            value = F.grid_sample(src, g, mode="bilinear", padding_mode="border",
                                  align_corners=True)[0, 0]  # fmt: skip
        out[z0:z1] = torch.where(inside, value, torch.tensor(float(fill), device=dev))
        valid[z0:z1] = inside.float()
    return out, valid


def _cubic(F, coef, ci, norm):
    """The cubic B-spline with coefficients ``coef`` (1, 1, D, H, W) at continuous indices
    ``ci`` (..., 3) zyx: eight trilinear lookups (mirror boundary)."""
    base = ci.floor()
    t = (ci - base).float()  # the fraction in float32; the integer part stays exact
    base = base.float()
    t2, t3 = t * t, t * t * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    g = (w0 + w1, w2 + w3)
    norm = norm.float()
    h = ((base - 1.0 + w1 / g[0]) * norm - 1.0, (base + 1.0 + w3 / g[1]) * norm - 1.0)
    total = None
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                pos = _positions(h[a][..., 0], h[b][..., 1], h[c][..., 2])
                v = F.grid_sample(coef, pos, mode="bilinear", padding_mode="reflection",
                                  align_corners=True)[0, 0]  # fmt: skip
                v = v * (g[a][..., 0] * g[b][..., 1] * g[c][..., 2])
                total = v if total is None else total.add_(v)
    return total


def _positions(z, y, x):
    """(1, ..., 3) grid_sample positions (x, y, z order) from three zyx components."""
    import torch

    return torch.stack((x, y, z), dim=-1)[None]


def gaussian_blur(volume, sigma_vox):
    """``scipy.ndimage.gaussian_filter(volume, sigma_vox, mode="nearest")`` of a (Z, Y, X)
    tensor (per-axis s.d. in voxels; radius ``int(4 s.d. + 0.5)``)."""
    out = volume
    for dim, s in enumerate(sigma_vox):
        s = float(s)
        if s <= 0:
            continue
        r = int(4.0 * s + 0.5)
        if r == 0:
            continue
        x = np.arange(-r, r + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / s) ** 2)
        out = correlate_nearest(out, dim, (w / w.sum()).tolist())
    return out


def correlate_nearest(x, dim: int, taps):
    """``x`` correlated along ``dim`` with the odd-length ``taps``, the edge value continued
    (``scipy.ndimage.correlate1d(mode="nearest")``), the same shape."""
    import torch

    r = len(taps) // 2
    n = x.shape[dim]
    idx = torch.clamp(torch.arange(-r, n + r, device=x.device), 0, n - 1)
    return _correlate(x.index_select(dim, idx), dim, list(taps))


def compose(local, box, fixed_geometry: Geometry, matrix, offset, alignment_matrix,
            alignment_offset):  # fmt: skip
    """``u(x) = R(A(x + w(x))) - x`` on the whole baseline grid, a float32 (3, Z, Y, X) tensor
    on ``local``'s device (or the CPU when ``local`` is None).

    ``local`` is w, (3, *box shape) mm on the crop ``box`` (zero outside); A is ``matrix @ x +
    offset`` in mm about the baseline's voxel 0 (the backends' frame); R is
    ``alignment_matrix @ p + alignment_offset`` on physical points p (``Alignment``'s). As
    ``sscflow.methods.registration.common.compose`` then ``frame.compose_rigid``, in one pass.
    """
    import torch

    dev = local.device if local is not None else torch.device("cpu")
    shape = fixed_geometry.shape
    sp = np.asarray(fixed_geometry.spacing, float)
    o = np.asarray(fixed_geometry.origin, float)
    a = np.asarray(matrix, float)
    r = np.asarray(alignment_matrix, float)
    # x relative to voxel 0 is q = i * sp; p = o + q. R(o + A q + a_off + A w) - (o + q)
    lin = r @ a - np.eye(3)
    const = r @ (o + np.asarray(offset, float)) + np.asarray(alignment_offset, float) - o
    ra = r @ a
    axes = [torch.arange(n, dtype=torch.float64, device=dev) * sp[k] for k, n in enumerate(shape)]
    out = torch.empty((3, *shape), dtype=torch.float32, device=dev)
    for k in range(3):
        part = (float(const[k]) + lin[k, 0] * axes[0])[:, None, None] \
            + (lin[k, 1] * axes[1])[None, :, None] + (lin[k, 2] * axes[2])[None, None, :]
        out[k] = part.float()
        if local is not None:
            w = local.float()
            out[(k, *box)] += ra[k, 0] * w[0] + ra[k, 1] * w[1] + ra[k, 2] * w[2]
    return out


def warm_up(device) -> float:
    """Run every kernel of a registration once on ``device`` (a tiny pair), once per process:
    a worker pays CUDA's context and kernel loading at its first patient only, and this
    function is what a worker can call when it starts. Returns the seconds it took (0 when
    the device was already warm)."""
    import torch

    key = str(torch.device(device))
    if key in _WARM:
        return 0.0
    with _WARM_LOCK:
        if key in _WARM:  # another thread warmed it while this one waited
            return 0.0
        return _warm_up(torch, key)


def _warm_up(torch, key: str) -> float:
    from sscflow.methods.registration.align import identity
    from sscflow.methods.registration.torch import Options
    from sscflow.methods.registration.torch import register as backend

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    n = 24
    g = Geometry((n, n, n), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    hu = (rng.normal(-700.0, 200.0, g.shape)).astype(np.float32)
    mask = np.zeros(g.shape, bool)
    mask[4:20, 4:20, 4:20] = True
    torch.linalg.inv(torch.eye(3, device=key))  # loads the device's linear algebra library
    fixed = to_device(hu, key)
    coef = bspline_coefficients(fixed)
    moving, valid = resample(fixed, g, g, np.eye(3), np.full(3, 0.3), coefficients=coef)
    moving = gaussian_blur(moving, (0.5, 0.5, 0.5))
    tiny = Options(device=key.split(":")[0], levels_mm=(4.0, 2.0), iterations=(1, 1),
                   affine_iterations=(1, 1))  # fmt: skip
    local, box, aff = backend(fixed, moving, g.spacing, mask=mask, valid=valid, options=tiny,
                              return_affine=True, as_tensor=True)  # fmt: skip
    ident = identity()
    u = compose(local, box, g, *aff, ident.matrix, ident.offset)
    if u.is_cuda:
        torch.cuda.synchronize(u.device)
    _WARM[key] = time.perf_counter() - t0
    return _WARM[key]
