"""Store size per patient: bytes per baseline voxel, full precision vs the bounded-error storage.

On the real CT (``../shared/data/lung1_image.nrrd``, canonical at ``--spacing`` mm) with the
planted change moved and re-imaged (``sscflow.synth.planted``: a displacement up to ~170 mm,
the patient rotated 15 degrees), so the field has the range of a real registration's:

- the displacement field and its log-Jacobian, written as the stages write them
  (``store.write_image``): full precision (no ``step``) and quantised (``displacement_step``,
  ``LOG_JACOBIAN_STEP``); bytes on disk per baseline voxel, the displacement's max error and the
  log-Jacobian-from-the-stored-field's max error against full precision;
- a whole patient: the CT pair, masks, coverage, displacement, log-Jacobian, and the template
  field and map (their grid taken as the baseline's: one patient is its own template), before
  and after.

Prints the whole-patient ratio after / before last. Importable: ``measure(spacing)`` returns the
figures (``benchmarks/gpu.py`` calls it).

    python benchmarks/store_size.py [--spacing 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sscflow.core import store as st
from sscflow.methods.ingest import to_canonical
from sscflow.methods.jacobian import log_jacobian
from sscflow.methods.segment import segment_lungs
from sscflow.synth import planted

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung1_image.nrrd"


def _bytes(group, name) -> int:
    path = Path(group.store.root) / group.path / name
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(spacing: float = 2.0, data: Path = DATA) -> dict:
    """Bytes per baseline voxel of each array and of the whole patient, before and after."""
    hu, g = to_canonical(sitk.ReadImage(str(data)), spacing)
    lung = segment_lungs(hu, g.spacing).mask.astype(bool)
    p = planted.plant_change(hu, g, lung, noise_hu=0.0)
    c = np.asarray(g.origin) + np.asarray(g.shape) * np.asarray(g.spacing) / 2
    r = planted.rotation(15.0, (0.3, 1.0, 0.5))
    off = c - r @ c + np.array([120.0, 30.0, -25.0])
    u = planted.moved_field(p.displacement, g, r, off).astype(np.float32)
    lj = np.asarray(log_jacobian(u, g.spacing))
    lj[~lung] = np.nan  # NaN outside the measured region, as the maps carry
    n = int(np.prod(g.shape))
    arrays = {  # name -> (data, step after)
        "baseline": (hu.astype(np.int16), None),
        "followup": (hu.astype(np.int16), None),  # an image of the same size and kind
        "lung_mask": (lung.astype(np.uint8), None),
        "followup_lung_mask": (lung.astype(np.uint8), None),
        "coverage": (np.ones(g.shape, np.uint8), None),
        "displacement": (u, st.displacement_step(g.spacing)),
        "log_jacobian": (lj, st.LOG_JACOBIAN_STEP),
        "template_displacement": (u, st.FIELD_STEP_MM),
        "log_jacobian_template": (lj, st.LOG_JACOBIAN_STEP),
    }
    out: dict = {"shape": g.shape, "spacing": spacing, "per_array": {}}
    with tempfile.TemporaryDirectory(prefix="sscflow-bench-store-") as tmp:
        for label, quantised in (("before", False), ("after", True)):
            group = st.patient_group(st.open_store(Path(tmp) / f"{label}.zarr"), "P1")
            for name, (a, step) in arrays.items():
                st.write_image(group, name, a, g, stage="bench", params={}, input_hash="x",
                               step=step if quantised else None)  # fmt: skip
                out["per_array"].setdefault(name, {})[label] = _bytes(group, name) / n
            if quantised:
                stored = np.asarray(group["displacement/0"][...])
                out["displacement_error_mm"] = float(np.abs(stored - u).max())
                tpl = np.asarray(group["template_displacement/0"][...])
                out["template_displacement_error_mm"] = float(np.abs(tpl - u).max())
                from_stored = np.asarray(log_jacobian(stored, g.spacing))
                lj_stored = st.quantise(from_stored, st.LOG_JACOBIAN_STEP)
                out["log_jacobian_error"] = float(np.nanmax(np.abs(lj_stored - lj)[lung]))
    for label in ("before", "after"):
        out[label] = sum(v[label] for v in out["per_array"].values())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=2.0)
    args = ap.parse_args(argv)
    m = measure(args.spacing)
    print(f"real CT at {args.spacing:g} mm, baseline grid {m['shape']}; bytes per baseline voxel")
    for name, v in m["per_array"].items():
        print(f"  {name:24s} before {v['before']:6.2f}  after {v['after']:6.2f}")
    print(f"displacement max error {m['displacement_error_mm']:.5f} mm, template displacement "
          f"{m['template_displacement_error_mm']:.5f} mm (bound 0.01); log-Jacobian "
          f"of the stored field, stored, vs full precision: max error "
          f"{m['log_jacobian_error']:.5f} (bound 0.001)")  # fmt: skip
    at1 = m["after"] * 30e6 / 1e6
    print(f"whole patient: before {m['before']:.2f} B/voxel, after {m['after']:.2f} B/voxel "
          f"(about {at1:.0f} MB at 1 mm, 30 million voxels), ratio after / before "
          f"{m['after'] / m['before']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
