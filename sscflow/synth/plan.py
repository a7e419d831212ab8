"""The cohort plan: labels, pulmonary function tests and every planted per-patient parameter.

No image is made here. One latent progression ``L ~ N(0, 1)`` per patient drives the visual
label, the planned mean log-Jacobian and the PFT changes, so that group sizes and rank
correlations resemble Chassagnon et al., Radiology 2021 (212 patients, 91 functional worsening,
73 / 132 / 7 visually worsened / stable / improved, Spearman rho of mean log-Jacobian with
Delta FVC% about +0.38 and with Delta DLCO% about +0.42 in sscflow's sign convention, where
shrinkage is negative).

Sign conventions: ``delta = followup - baseline`` (a decline is negative); a *decline* is
``baseline - followup``. Functional worsening: FVC% decline >= 10 points or DLCO% decline >= 15
points, evaluated on the values rounded to one decimal as they are written.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr
from scipy.stats import rankdata

PAPER_N = 212
PAPER_FUNCTIONAL_WORSENING = 91
PAPER_VISUAL = {"worsened": 73, "stable": 132, "improved": 7}
TARGET_RHO = {"fvc": 0.38, "dlco": 0.42, "tlc": 0.35, "kco": 0.20}
FORMATS = ("nifti", "mha", "dicom")

#: Seed-sequence stream of the cohort-level draws (patient streams use their 0-based index).
PLAN_STREAM = 0x504C414E
#: Children spawned from ``SeedSequence([seed, index])``, in this order.
PATIENT_STREAMS = ("plan", "anatomy", "vessels", "texture", "noise_baseline", "noise_followup")

# Planned mean log-Jacobian m = MU_M - SIGMA_M * (R_M * L + sqrt(1 - R_M^2) * e)
MU_M, SIGMA_M, R_M = -0.01, 0.04, 0.8
# PFT baselines (% predicted): mean, sd, clip range; changes: mean, sd (points)
PFT_BASELINE = {
    "fvc": (80.0, 18.0, 35.0, 140.0),
    "dlco": (60.0, 15.0, 20.0, 120.0),
    "tlc": (85.0, 15.0, 40.0, 140.0),
    "kco": (80.0, 15.0, 25.0, 150.0),
}
PFT_CHANGE = {"fvc": (-2.0, 7.0), "dlco": (-3.0, 9.0), "tlc": (-1.5, 6.0), "kco": (-1.0, 8.0)}
PFT_FLOOR = 10.0  # no follow-up PFT below this % predicted
FVC_DECLINE, DLCO_DECLINE = 10.0, 15.0


def patient_id(index: int, n_patients: int) -> str:
    """``SYN001`` for index 0; zero-padded to at least three digits (more for n >= 1000).

    >>> patient_id(0, 24), patient_id(999, 1000), patient_id(1000, 1001)
    ('SYN001', 'SYN1000', 'SYN1001')
    """
    return f"SYN{index + 1:0{max(3, len(str(n_patients)))}d}"


def patient_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators for one patient, fixed by ``(seed, index)`` only.

    The same patient gets the same anatomy whatever the cohort size or execution order.
    """
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(len(PATIENT_STREAMS))
    return {
        name: np.random.default_rng(c) for name, c in zip(PATIENT_STREAMS, children, strict=True)
    }


def largest_remainder(n: int, weights: dict[str, int]) -> dict[str, int]:
    """Split ``n`` into integer counts proportional to ``weights`` (Hamilton's method).

    >>> largest_remainder(212, PAPER_VISUAL)
    {'worsened': 73, 'stable': 132, 'improved': 7}
    >>> largest_remainder(24, PAPER_VISUAL)
    {'worsened': 8, 'stable': 15, 'improved': 1}
    """
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(np.floor(q)) for k, q in quotas.items()}
    left = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), list(weights).index(k)))[
        :left
    ]:
        counts[k] += 1
    return counts


def functional_worsening(fvc_b, fvc_f, dlco_b, dlco_f) -> np.ndarray:
    """The ATS/ERS rule on values with one decimal: FVC% decline >= 10 or DLCO% decline >= 15.

    Declines are compared in integer tenths, so ``80.3 - 70.3`` counts as exactly 10.
    """
    fvc_decline = np.rint(np.asarray(fvc_b) * 10) - np.rint(np.asarray(fvc_f) * 10)
    dlco_decline = np.rint(np.asarray(dlco_b) * 10) - np.rint(np.asarray(dlco_f) * 10)
    return (fvc_decline >= FVC_DECLINE * 10) | (dlco_decline >= DLCO_DECLINE * 10)


def spearman(a, b) -> float:
    """Spearman's rho (average ranks for ties); NaN when either input is constant or n < 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _calibrated_mix(m, latent, noise, target: float) -> np.ndarray:
    """``-(r L + sqrt(1 - r^2) e)`` with r in [0, 1] chosen so that Spearman(m, .) ~= target.

    Bisection on r (the rank correlation rises with r). For n < 8 the rho of a draw is too
    noisy to calibrate, so r = target / R_M (the population value) is used.
    """

    def mix(r):
        return -(r * latent + np.sqrt(1.0 - r * r) * noise)

    if m.size < 8:
        return mix(min(1.0, target / R_M))
    lo, hi = 0.0, 1.0
    if spearman(m, mix(lo)) >= target:
        return mix(lo)
    if spearman(m, mix(hi)) <= target:
        return mix(hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if spearman(m, mix(mid)) < target:
            lo = mid
        else:
            hi = mid
    return mix(0.5 * (lo + hi))


def _followup(base, change, shift):
    return np.round(np.maximum(base + change + shift, PFT_FLOOR), 1)


def _shift_for_count(fvc_b, d_fvc, dlco_b, d_dlco, target: int) -> float:
    """A common shift of Delta FVC and Delta DLCO that makes exactly ``target`` patients worsen.

    The count of functional worsening does not increase with the shift, so the edges of the
    interval of shifts giving ``target`` are found by bisection and its middle is returned.
    """

    def count(shift):
        fvc_f = _followup(fvc_b, d_fvc, shift)
        dlco_f = _followup(dlco_b, d_dlco, shift)
        return int(functional_worsening(fvc_b, fvc_f, dlco_b, dlco_f).sum())

    def first_at_most(k):  # smallest shift with count(shift) <= k
        lo, hi = -200.0, 200.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if count(mid) <= k:
                hi = mid
            else:
                lo = mid
        return hi

    a = first_at_most(target)
    b = first_at_most(target - 1) if target > 0 else a + 20.0
    shift = 0.5 * (a + b)
    if count(shift) != target:  # two patients cross at the same shift: measure zero
        raise RuntimeError(f"plan_cohort: could not reach {target} functional worsening")
    return shift


def plan_cohort(n_patients: int, seed: int = 0) -> pd.DataFrame:
    """Draw labels, PFTs and planted deformation / density parameters for a synthetic cohort.

    Parameters
    ----------
    n_patients : int, >= 1
    seed : int
        Cohort-level draws use ``SeedSequence([seed, PLAN_STREAM])``; per-patient geometry
        draws use the ``plan`` child of ``SeedSequence([seed, index])``.

    Returns
    -------
    pandas.DataFrame, one row per patient, in index order. Columns include the manifest fields
    (``patient_id``, ``fvc_baseline`` ... ``kco_followup`` in % predicted with one decimal,
    ``visual`` in worsened|stable|improved, ``interval_months``, ``age``, ``sex`` F|M), the
    label ``functional`` (worsening|stable), ``format`` (nifti|mha|dicom, cycling by index),
    the latent progression, the planned mean log-Jacobian inside the lung
    (``planned_mean_logjac``), the regional divergence peak (``regional_strength``: negative for
    shrinkage, positive for expansion, 0 for stable), the target extreme log-Jacobian
    (``regional_target``), sink widths and centres (``sink_sigma_mm_{r,l}``,
    ``sink_fy_{r,l}`` / ``sink_fx_{r,l}`` as fractions of the lung box from anterior / medial,
    ``sink_above_mm_{r,l}`` above the diaphragm), densities (``baseline_ild_hu``,
    ``baseline_extra_hu``, ``density_change_hu``: the planted peak follow-up minus baseline)
    and the patient-position change (``rotation_deg``, ``rotation_axis_{z,y,x}``,
    ``translation_{z,y,x}_mm``).

    Raises
    ------
    ValueError if ``n_patients`` < 1.

    Examples
    --------
    >>> plan = plan_cohort(212, seed=0)
    >>> plan["visual"].value_counts().to_dict()
    {'stable': 132, 'worsened': 73, 'improved': 7}
    >>> int((plan["functional"] == "worsening").sum())
    91
    """
    n = int(n_patients)
    if n < 1:
        raise ValueError(f"plan_cohort: n_patients must be at least 1, got {n_patients}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), PLAN_STREAM]))
    latent = rng.standard_normal(n)

    counts = largest_remainder(n, PAPER_VISUAL)
    order = np.argsort(-(latent + 0.5 * rng.standard_normal(n)), kind="stable")
    visual = np.full(n, "stable", dtype=object)
    visual[order[: counts["worsened"]]] = "worsened"
    if counts["improved"]:
        visual[order[n - counts["improved"] :]] = "improved"

    m = MU_M - SIGMA_M * (R_M * latent + np.sqrt(1 - R_M**2) * rng.standard_normal(n))
    m = np.clip(m, -0.2, 0.2)

    table: dict[str, np.ndarray] = {}
    for name, (mean, sd, lo, hi) in PFT_BASELINE.items():
        table[f"{name}_baseline"] = np.round(np.clip(rng.normal(mean, sd, n), lo, hi), 1)
    change = {}
    for name, (mean, sd) in PFT_CHANGE.items():
        mix = _calibrated_mix(m, latent, rng.standard_normal(n), TARGET_RHO[name])
        change[name] = mean + sd * mix
    target_fw = int(np.floor(PAPER_FUNCTIONAL_WORSENING / PAPER_N * n + 0.5))
    shift = _shift_for_count(
        table["fvc_baseline"], change["fvc"], table["dlco_baseline"], change["dlco"], target_fw
    )
    for name in PFT_CHANGE:
        s = shift if name in ("fvc", "dlco") else 0.0
        table[f"{name}_followup"] = _followup(table[f"{name}_baseline"], change[name], s)
    functional = functional_worsening(
        table["fvc_baseline"], table["fvc_followup"], table["dlco_baseline"], table["dlco_followup"]
    )

    interval = np.round(rng.uniform(9.0, 36.0, n), 1)
    age = np.clip(np.rint(rng.normal(55.0, 13.0, n)), 18, 85).astype(int)
    sex = np.where(rng.random(n) < 0.8, "F", "M")

    rows = []
    for i in range(n):
        rows.append(
            _patient_parameters(i, n, seed, visual[i], latent[i], m[i])
            | {k: table[k][i] for k in table}
            | {
                "functional": "worsening" if functional[i] else "stable",
                "interval_months": interval[i],
                "age": int(age[i]),
                "sex": sex[i],
            }
        )
    columns = [
        "patient_id", "index", "format", "visual", "functional",
        "fvc_baseline", "fvc_followup", "dlco_baseline", "dlco_followup",
        "tlc_baseline", "tlc_followup", "kco_baseline", "kco_followup",
        "interval_months", "age", "sex", "latent", "planned_mean_logjac",
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    return frame[columns + [c for c in frame.columns if c not in columns]]


def _patient_parameters(i, n, seed, visual, latent, m) -> dict:
    """Planted deformation and density parameters of one patient (per-patient stream)."""
    rng = patient_streams(seed, i)["plan"]
    severity = float(ndtr((latent - 0.9) / 0.6))  # 0..1, larger = more progression
    p = {
        "patient_id": patient_id(i, n),
        "index": i,
        "format": FORMATS[i % len(FORMATS)],
        "visual": visual,
        "latent": float(latent),
        "planned_mean_logjac": float(m),
    }
    for side in ("r", "l"):
        p[f"sink_sigma_mm_{side}"] = float(rng.uniform(18.0, 28.0))
        p[f"sink_fy_{side}"] = float(rng.uniform(0.72, 0.86))
        p[f"sink_fx_{side}"] = float(rng.uniform(0.35, 0.65))
        p[f"sink_above_mm_{side}"] = float(rng.uniform(14.0, 24.0))
    ild = float(rng.uniform(0.0, 150.0))
    extra, change, strength, target = 0.0, 0.0, 0.0, 0.0
    u_strength, u_density, u_extra, u_frac = rng.random(4)
    if visual == "worsened":
        # extreme total log-Jacobian ~ -(0.2..0.4); total = global s (~m) + local (-strength)
        target = -(0.2 + 0.2 * np.clip(0.7 * severity + 0.3 * u_strength, 0, 1))
        strength = -float(np.clip(-target + m, 0.12, 0.5))
        change = float(np.clip(100.0 + 300.0 * (0.6 * severity + 0.4 * u_density), 100, 400))
    elif visual == "improved":
        target = 0.1 + 0.15 * float(u_strength)
        strength = float(np.clip(target - m, 0.05, 0.3))
        extra = float(80.0 + 70.0 * u_extra)
        ild = min(ild, 220.0 - extra)
        change = -extra * float(0.4 + 0.4 * u_frac)
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    p |= {
        "regional_strength": float(strength),
        "regional_target": float(target),
        "baseline_ild_hu": ild,
        "baseline_extra_hu": extra,
        "density_change_hu": change,
        "rotation_deg": float(rng.uniform(0.0, 2.0)),
        "rotation_axis_z": float(axis[0]),
        "rotation_axis_y": float(axis[1]),
        "rotation_axis_x": float(axis[2]),
    }
    for k, t in zip("zyx", np.clip(rng.normal(0.0, 2.0, 3), -5.0, 5.0), strict=True):
        p[f"translation_{k}_mm"] = float(t)
    return p
