"""PyTorch backend: affine, then a diffeomorphic stationary velocity field with local NCC.

Runs on CPU, or on CUDA when available (``device="auto"``). PyTorch is imported inside the
functions, so ``import sscflow`` does not load it.

Method (decisions):

1. Intensities: HU clipped to [-1000, 400] and scaled to [0, 1].
2. Crop: the fixed (baseline) volume is cropped to the lung bounding box plus ``margin_mm``; the
   moving volume is used whole, so the warped crop never samples outside what was imaged.
3. Pyramid: box-averaged images at the shrink ``levels`` (default 4, 2, 1).
4. Affine ``y = c + (I + L)(x - c) + t`` about the crop centre, by Adam on ``1 - LNCC`` on the
   two coarsest levels (``affine_iterations``); it absorbs the inspiration and position change.
5. Deformable: the map is ``x -> A(exp(v)(x))`` with a stationary velocity field ``v`` (mm) on
   a grid at least ``velocity_shrink`` voxels coarse, integrated by scaling and squaring
   (``squarings`` steps), so the result is a diffeomorphism up to interpolation. ``v`` is
   multiplied by a cosine taper that is 1 over the lung bounding box and 0 at the crop border:
   outside the crop the field is exactly the affine part and continuous with the inside.
   Loss: ``1 - LNCC`` (squared local correlation, window ``window`` voxels of each level,
   stabilised by ``(ncc_floor_hu / 1400)^4``: a window whose local standard deviations are
   well below ``ncc_floor_hu`` HU counts as flat; much larger values turn the similarity into a
   squared covariance that favours contrast over correspondence and damped a regional
   shrinkage by ~15%; much smaller ones match noise) plus
   optionally ``diffusion`` times the mean squared velocity gradient. Gradient descent: the
   gradient is smoothed (``gradient_sigma``, fluid-like) and scaled so that the largest update
   is ``learning_rate`` velocity-grid voxels; then the part of ``v`` added at the current level
   is smoothed (``velocity_sigma``, diffusion-like, demons style), which keeps log-Jacobian
   noise small. The coarser levels' result is not smoothed again at every step of the finer
   ones: that repeated smoothing damped a regional shrinkage's peak. ``velocity_sigma`` and
   ``gradient_sigma`` may also be given per level. (Adam was tried: its per-voxel
   normalisation turned noise in flat regions into full-size steps.)
   The similarity gradient is taken with respect to the displacement ``exp(v)`` on the velocity
   grid and used as the velocity's (``d exp(v) / dv ~ I``, as in log-domain demons), which
   skips the backward pass through the squarings.
   The warped image is linearised in the displacement for the gradient (its value from
   ``grid_sample``, its slope from central differences of the warped image): this avoids
   ``grid_sample``'s backward pass, the most expensive step on CPU, at no loss of accuracy.
   Local NCC is invariant to a local linear intensity change, so a fibrosis-like density rise
   in a shrinking region is not read as less shrinkage (an SSD or demons similarity is).
"""

from __future__ import annotations

import math

import numpy as np

from sscflow.registration.common import compose, crop_box, n_threads

HU_RANGE = (-1000.0, 400.0)


def register(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing,
    *,
    mask=None,
    device: str = "auto",
    margin_mm: float = 15.0,
    levels=(4, 2, 1),
    iterations=(40, 30, 20),
    affine_iterations=(100,),
    window: int = 5,
    ncc_floor_hu: float = 32.0,
    velocity_sigma: float = 1.5,
    gradient_sigma: float = 1.0,
    diffusion: float = 0.0,
    learning_rate: float = 0.6,
    velocity_shrink: int = 2,
    squarings: int = 6,
    threads: int = 0,
    return_affine: bool = False,
):
    """See :func:`sscflow.registration.register` (inputs already checked).

    With ``return_affine`` also returns the affine ``(matrix, offset)`` (zyx mm about voxel 0).
    """
    import torch

    dev = _device(device)
    if dev.type == "cpu":
        torch.set_num_threads(n_threads(threads))
    levels = tuple(int(f) for f in levels)
    iterations = tuple(int(n) for n in iterations)
    if len(iterations) != len(levels):
        raise ValueError(
            f"torch backend: iterations needs one count per level {levels}, got {iterations}"
        )
    shape = fixed.shape
    sp = torch.tensor(spacing, dtype=torch.float32, device=dev)
    box = crop_box(mask, spacing, margin_mm, shape)
    inner = crop_box(mask, spacing, 0.0, shape) if mask is not None else box

    def prep(a):
        a = np.clip(a, *HU_RANGE)
        a = (a - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)[None, None]

    f_full = prep(fixed[box])
    m_full = prep(moving)
    start = torch.tensor([b.start for b in box], dtype=torch.float32, device=dev)
    crop_n = [b.stop - b.start for b in box]
    centre = (start + (torch.tensor(crop_n, device=dev) - 1) / 2) * sp  # mm

    # local NCC's stabiliser: windows whose local standard deviations (in both images) are
    # below ~ncc_floor_hu count as flat, so noise there is not matched as structure
    eps = (float(ncc_floor_hu) / (HU_RANGE[1] - HU_RANGE[0])) ** 4
    reg = _Registration(
        torch, dev, sp, start, crop_n, centre, window=window, shape=shape, m_full=m_full, eps=eps
    )
    pyramid = {f: (reg.pool(f_full, f), reg.pool(m_full, f)) for f in set(levels)}

    # --- affine, on the coarsest levels
    lin = torch.zeros(3, 3, device=dev, requires_grad=True)
    trans = torch.zeros(3, device=dev, requires_grad=True)
    aff_levels = sorted(set(levels), reverse=True)[: len(affine_iterations)]
    for factor, n_iter in zip(aff_levels, affine_iterations, strict=False):
        if n_iter == 0:
            continue
        f_img, m_img = pyramid[factor]
        pts = reg.points(factor, f_img.shape[2:])  # (3, D, H, W) mm
        stats = reg.fixed_stats(f_img)
        opt = torch.optim.Adam([{"params": [lin], "lr": 0.01}, {"params": [trans], "lr": 1.0}])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_iter)
        level_mm = [float(x) * factor for x in spacing]
        c = centre.view(3, 1, 1, 1)
        for _ in range(n_iter):
            opt.zero_grad(set_to_none=True)
            mat = torch.eye(3, device=dev) + lin
            y = c + torch.einsum("ij,j...->i...", mat, pts - c) + trans.view(3, 1, 1, 1)
            with torch.no_grad():
                base, _ = reg.moving_grid(m_img, factor, pts, lin, trans)
                value = reg.sample(m_img, base)
                # the moving image's slope at y: grad_x warped = (I + L)^T grad_y moving
                slope = torch.stack(torch.gradient(value[0, 0], spacing=level_mm))
                slope = torch.einsum("ij,j...->i...", torch.linalg.inv(mat.T), slope)[None]
            # linearised in y, as in the deformable stage (no grid_sample backward pass)
            warped = value + ((y - y.detach())[None] * slope).sum(1, keepdim=True)
            loss = 1.0 - reg.lncc(stats, warped)
            loss.backward()
            opt.step()
            sched.step()
    lin = lin.detach()
    trans = trans.detach()

    # --- deformable (SVF)
    vel = None
    taper = None
    vsigmas = _per_level(velocity_sigma, len(levels), "velocity_sigma")
    gsigmas = _per_level(gradient_sigma, len(levels), "gradient_sigma")
    for factor, n_iter, vsigma, gsigma in zip(levels, iterations, vsigmas, gsigmas, strict=True):
        f_img, m_img = pyramid[factor]
        pts = reg.points(factor, f_img.shape[2:])
        vstep = factor * int(velocity_shrink)
        vshape = [max(2, math.ceil((n - 1) / vstep) + 1) for n in crop_n]
        vspacing = torch.tensor(
            [(n - 1) * s / (m - 1) for n, s, m in zip(crop_n, spacing, vshape, strict=True)],
            device=dev,
        )
        if vel is None:
            vel = torch.zeros(1, 3, *vshape, device=dev)
        elif list(vel.shape[2:]) != vshape:
            vel = torch.nn.functional.interpolate(
                vel, size=vshape, mode="trilinear", align_corners=True
            )
        vel = vel.detach().requires_grad_(True)
        vel_start = vel.detach().clone()  # the coarser levels' result: not smoothed again
        taper = reg.taper(vshape, box, inner)
        grid_f = reg.velocity_grid(factor, f_img.shape[2:])  # fixed-level points, normalised
        stats = reg.fixed_stats(f_img)
        with torch.no_grad():
            base, to_grid = reg.moving_grid(m_img, factor, pts, lin, trans)
        kernel = _gauss_kernels(torch, vsigma, dev)
        gkernel = _gauss_kernels(torch, gsigma, dev)
        vox = float(vspacing.mean())
        step = learning_rate * vox
        level_mm = [float(x) * factor for x in spacing]
        for _ in range(n_iter):
            vel.grad = None
            # The similarity gradient is taken with respect to the displacement exp(v) and
            # used as the velocity's (d exp(v)/dv ~ I, as in log-domain demons): this skips
            # the backward pass through the squarings, a third of an iteration's cost.
            with torch.no_grad():
                disp = reg.exp(vel * taper, vspacing, squarings)
            disp.requires_grad_(True)
            w = reg.upsample(disp, grid_f, factor)  # (1, 3, D, H, W) mm at the level's voxels
            with torch.no_grad():
                value = reg.sample(m_img, base + w[0].detach().permute(1, 2, 3, 0) @ to_grid)
                slope = torch.stack(torch.gradient(value[0, 0], spacing=level_mm))[None]
            # The warped image, linearised in w: its value, and the gradient of the warped
            # image as d(warped)/dw (exact up to a factor I + grad u). Much cheaper than
            # differentiating the resampling (grid_sample's backward pass on CPU).
            warped = value + ((w - w.detach()) * slope).sum(1, keepdim=True)
            loss = 1.0 - reg.lncc(stats, warped)
            loss.backward()
            if diffusion > 0:
                (diffusion * _diffusion(vel / vspacing.view(1, 3, 1, 1, 1))).backward()
            with torch.no_grad():
                grad = disp.grad * taper
                if vel.grad is not None:
                    grad = grad + vel.grad
                if gkernel is not None:
                    grad = _smooth(torch, grad, gkernel)
                norm = grad.square().sum(1).sqrt().amax().clamp(min=1e-12)
                vel -= grad * (step / norm)  # the largest update is ``learning_rate`` voxels
                if kernel is not None:
                    vel.copy_(vel_start + _smooth(torch, vel - vel_start, kernel))
    with torch.no_grad():
        matrix = (torch.eye(3, device=dev) + lin).double().cpu().numpy()
        offset = (centre.double() + trans.double() - (torch.eye(3, device=dev) + lin).double()
                  @ centre.double()).cpu().numpy()  # fmt: skip
        local = None
        if vel is not None:
            disp = reg.exp(vel * taper, vspacing, squarings)
            grid = reg.velocity_grid(1, crop_n)
            local = torch.nn.functional.grid_sample(
                disp, grid, mode="bilinear", padding_mode="border", align_corners=True
            )[0]
            local = local.cpu().numpy()
    u = compose(local, box, shape, spacing, matrix, offset)
    return (u, (matrix, offset)) if return_affine else u


def _per_level(value, n, name):
    """One float per level: a number for all levels, or a sequence of ``n`` numbers."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    out = [float(x) for x in value]
    if len(out) != n:
        raise ValueError(f"torch backend: {name} needs one value or one per level, got {value}")
    return out


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("torch backend: device='cuda' but no CUDA device is available; "
                         "use device='cpu' or 'auto'")  # fmt: skip
    return torch.device(device)


class _Registration:
    """Grids and operators shared by the affine and deformable stages of one registration."""

    def __init__(self, torch, dev, sp, start, crop_n, centre, *, window, shape, m_full, eps):
        self.torch = torch
        self.F = torch.nn.functional
        self.dev = dev
        self.sp = sp
        self.start = start
        self.crop_n = crop_n
        self.centre = centre
        self.window = int(window)
        self.eps = float(eps)
        self.shape = shape
        self.moving_shape = {}
        self._box = torch.ones(1, 1, self.window, device=dev) / self.window

    # -- pyramid and grids
    def pool(self, image, factor):
        if factor == 1:
            return image
        return self.F.avg_pool3d(image, factor, factor, ceil_mode=True)

    def points(self, factor, size):
        """mm (zyx, about full voxel 0) of the fixed-level crop voxels, (3, D, H, W)."""
        torch = self.torch
        axes = [
            (self.start[k] + (factor - 1) / 2 + factor * torch.arange(n, device=self.dev))
            * self.sp[k]
            for k, n in enumerate(size)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))

    def velocity_grid(self, factor, size):
        """Normalised (xyz, for grid_sample) positions of fixed-level crop voxels in the
        velocity grid, which spans the crop from its first to its last full-resolution voxel."""
        torch = self.torch
        axes = []
        for k, n in enumerate(size):
            idx = (factor - 1) / 2 + factor * torch.arange(n, device=self.dev, dtype=torch.float32)
            axes.append(2 * idx / max(self.crop_n[k] - 1, 1) - 1)
        g = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return g.flip(-1)[None]

    def taper(self, vshape, box, inner):
        """1 over the lung bounding box, a cosine ramp to 0 at the crop border (velocity grid)."""
        torch = self.torch
        out = torch.ones(vshape, device=self.dev)
        for k, m in enumerate(vshape):
            n = self.crop_n[k]
            pos = torch.linspace(0, n - 1, m, device=self.dev)  # crop voxel index
            lo = float(inner[k].start - box[k].start)
            hi = float(inner[k].stop - 1 - box[k].start)
            a = torch.clamp(pos / max(lo, 1e-6), 0, 1) if lo > 0 else torch.ones_like(pos)
            room = (n - 1) - hi
            b = torch.clamp(((n - 1) - pos) / room, 0, 1) if room > 0 else torch.ones_like(pos)
            ramp = 0.5 - 0.5 * torch.cos(math.pi * torch.minimum(a, b))
            shp = [1, 1, 1]
            shp[k] = m
            out = out * ramp.view(shp)
        return out[None, None]

    # -- transforms
    def moving_grid(self, m_img, factor, pts, lin, trans):
        """Where A(pts) falls in the moving level image, normalised for grid_sample.

        Returns ``base`` (1, D, H, W, 3) (x, y, z order) and ``to_grid`` (3, 3), such that a
        displacement w (mm, zyx, channels last) moves the sample to ``base + w @ to_grid``.
        """
        torch = self.torch
        mat = torch.eye(3, device=self.dev) + lin
        c = self.centre.view(3, 1, 1, 1)
        y = c + torch.einsum("ij,j...->i...", mat, pts - c) + trans.view(3, 1, 1, 1)
        n = torch.tensor(m_img.shape[2:], device=self.dev, dtype=torch.float32)
        scale = 2.0 / (self.sp * factor * (n - 1).clamp(min=1))  # mm -> normalised, per axis
        offset = 2 * (-(factor - 1) / 2) / (factor * (n - 1).clamp(min=1)) - 1
        norm = y * scale.view(3, 1, 1, 1) + offset.view(3, 1, 1, 1)
        base = norm.permute(1, 2, 3, 0).flip(-1)[None]
        to_grid = (mat * scale.view(3, 1)).T.flip(-1)  # w_zyx @ to_grid -> xyz normalised
        return base, to_grid

    def upsample(self, disp, grid_f, factor):
        """The velocity-grid displacement at the level's crop voxels (trilinear)."""
        if factor == 1:  # the velocity grid spans the crop corner to corner
            return self.F.interpolate(disp, size=self.crop_n, mode="trilinear", align_corners=True)
        return self.F.grid_sample(
            disp, grid_f, mode="bilinear", padding_mode="border", align_corners=True
        )

    def sample(self, m_img, grid):
        return self.F.grid_sample(
            m_img, grid, mode="bilinear", padding_mode="border", align_corners=True
        )

    def exp(self, vel, vspacing, squarings):
        """Scaling and squaring: the displacement (mm) of exp(v) on the velocity grid."""
        torch = self.torch
        shape = vel.shape[2:]
        scale = (2.0 / ((torch.tensor(shape, device=self.dev) - 1) * vspacing)).view(1, 3, 1, 1, 1)
        ident = self._identity(tuple(shape))
        disp = vel / (2**squarings)
        for _ in range(squarings):
            grid = ident + (disp * scale).permute(0, 2, 3, 4, 1).flip(-1)
            disp = disp + self.F.grid_sample(
                disp, grid, mode="bilinear", padding_mode="border", align_corners=True
            )
        return disp

    def _identity(self, shape):
        torch = self.torch
        axes = [torch.linspace(-1, 1, n, device=self.dev) for n in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)[None]

    # -- similarity
    def fixed_stats(self, a):
        """Local mean and variance of the fixed image (constant during optimisation)."""
        with self.torch.no_grad():
            m = _box_filter(self.torch, self.torch.cat([a, a * a], dim=1), self.window)
            ma, maa = m[:, :1], m[:, 1:]
            return a, ma, (maa - ma * ma).clamp(min=0)

    def lncc(self, stats, b):
        """Mean squared local correlation of the fixed image (``stats``) and ``b``."""
        a, ma, va = stats
        m = _box_filter(self.torch, self.torch.cat([b, b * b, a * b], dim=1), self.window)
        mb, mbb, mab = m[:, :1], m[:, 1:2], m[:, 2:]
        cov = mab - ma * mb
        vb = (mbb - mb * mb).clamp(min=0)
        cc = cov * cov / (va * vb + self.eps)
        return cc.mean()


def _box_filter(torch, x, k):
    """Separable moving average of width ``k`` over the last three axes (edge replicated)."""
    r = k // 2
    x = torch.nn.functional.pad(x, (r, r, r, r, r, r), mode="replicate")
    return _box_valid(torch).apply(x, k)


def _box_sum(torch, x, k, pad):
    """Separable mean of width ``k`` (depthwise conv3d), after zero padding ``pad`` per side."""
    F = torch.nn.functional
    c = x.shape[1]
    if pad:
        x = F.pad(x, (pad,) * 6)
    w = torch.full((c, 1, k, 1, 1), 1.0 / k, device=x.device, dtype=x.dtype)
    x = F.conv3d(x, w, groups=c)
    x = F.conv3d(x, w.view(c, 1, 1, k, 1), groups=c)
    return F.conv3d(x, w.view(c, 1, 1, 1, k), groups=c)


_BOX = []


def _box_valid(torch):
    """An autograd function: the 'valid' box mean, whose backward pass is the same box mean of
    the zero-padded gradient (the filter is symmetric). conv3d's own backward for depthwise
    kernels is several times slower than its forward on CPU."""
    if not _BOX:

        class BoxValid(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, k):
                ctx.k = k
                return _box_sum(torch, x, k, 0)

            @staticmethod
            def backward(ctx, g):
                return _box_sum(torch, g, ctx.k, ctx.k - 1), None

        _BOX.append(BoxValid)
    return _BOX[0]


def _gauss_kernels(torch, sigma, dev):
    if sigma <= 0:
        return None
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=dev)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _smooth(torch, x, g):
    """Separable Gaussian over the last three axes of (1, C, D, H, W), edge replicated."""
    F = torch.nn.functional
    c = x.shape[1]
    r = (g.numel() - 1) // 2
    x = F.pad(x, (r, r, r, r, r, r), mode="replicate")
    k = g.numel()
    w = g.view(1, 1, k, 1, 1).repeat(c, 1, 1, 1, 1)
    x = F.conv3d(x, w, groups=c)
    x = F.conv3d(x, w.view(c, 1, 1, k, 1), groups=c)
    return F.conv3d(x, w.view(c, 1, 1, 1, k), groups=c)


def _diffusion(v):
    """Mean squared forward difference of a (1, 3, D, H, W) field (per voxel units)."""
    dz = v[:, :, 1:] - v[:, :, :-1]
    dy = v[:, :, :, 1:] - v[:, :, :, :-1]
    dx = v[..., 1:] - v[..., :-1]
    return (dz * dz).mean() + (dy * dy).mean() + (dx * dx).mean()
