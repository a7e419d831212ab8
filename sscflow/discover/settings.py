"""The ``discover:`` section of the config: which series, studies and patients make the cohort.

The defaults are the selection of Chassagnon et al. (Radiology 2021): unenhanced, supine,
inspiratory chest CT with thin sections (1.5 mm or less; thinner preferred), lung (sharp) kernels
preferred over soft ones, pulmonary function tests within 3 months of each CT, and per patient the
oldest and the most recent such CT.

This module imports nothing from sscflow but the errors, so :mod:`sscflow.config` can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sscflow.errors import ConfigError

# Lung / sharp reconstruction kernels of the major vendors, as regular expressions matched
# case-insensitively against the whole ConvolutionKernel value (its first value when several).
# Extend with ``discover.extra_lung_kernels``; replace with ``discover.lung_kernels``.
DEFAULT_LUNG_KERNELS = (
    # GE: LUNG, BONE, BONEPLUS, EDGE, DETAIL (and their HD variants)
    r"(HD)?\s*(LUNG|BONE|BONE\s*PLUS|BONEPLUS|EDGE|DETAIL|CHST|CHEST)(\s*HD)?",
    # Siemens: B/I/Br/Bl/Hr/Qr kernels from 50 up (B60f, B70s, I70f, Br59, Bl64, Qr59 ...)
    r"(B|I|BR|BL|HR|QR|BF)[5-9][0-9][A-Z]?",
    # Philips: L (lung), E/Y-sharp families (LA, YA, YB, YC, YD, E, EB)
    r"(L|LA|LB|E|EA|EB|YA|YB|YC|YD|YE)",
    # Canon / Toshiba: FC50-FC59 (lung), FC80-FC86 (lung / bone), LUNG in AiCE / FIRST names
    r"FC(5[0-9]|8[0-6])|.*\bLUNG\b.*",
    # Fujifilm / Hitachi, United Imaging: lung, sharp
    r".*\b(SHARP|B_SHARP|B_LUNG|LUNG_SHARP)\b.*",
)
# Series descriptions (or protocol names) that mark a contrast-enhanced or expiratory series.
DEFAULT_CONTRAST_PATTERNS = (
    r"\bC\+",
    r"contrast",
    r"\bangio",
    r"arterial",
    r"portal",
    r"\bvenous",
    r"\binject",
    r"\bIV\b",
)
DEFAULT_EXPIRATORY_PATTERNS = (r"expi", r"\bexp\b", r"exhal")


@dataclass
class PFTColumns:
    """Column names of the pulmonary function test CSV."""

    patient_id: str = "patient_id"  # the DICOM PatientID
    date: str = "date"  # ISO, YYYY-MM-DD
    fvc: str = "fvc"  # % predicted; missing values allowed
    dlco: str = "dlco"
    tlc: str = "tlc"
    kco: str = "kco"

    def validate(self, where: str) -> None:
        names = [getattr(self, n) for n in ("patient_id", "date", "fvc", "dlco", "tlc", "kco")]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"{where}: column names must be non-empty and distinct, got {names}")


@dataclass
class DiscoverConfig:
    """How ``sscflow discover`` turns a DICOM export into a manifest (see README)."""

    min_extent_mm: float = 150.0  # craniocaudal coverage a series needs to hold a chest
    max_slice_thickness_mm: float = 1.5  # SliceThickness at most this; thinner is preferred
    require_lung_kernel: bool = False  # true: only lung kernels; false: preferred in the ranking
    lung_kernels: tuple[str, ...] = DEFAULT_LUNG_KERNELS
    extra_lung_kernels: tuple[str, ...] = ()  # added to lung_kernels (site-specific names)
    allow_contrast: bool = False  # false: a series with contrast (agent tag or pattern) is out
    contrast_patterns: tuple[str, ...] = DEFAULT_CONTRAST_PATTERNS
    expiratory_patterns: tuple[str, ...] = DEFAULT_EXPIRATORY_PATTERNS
    patient_positions: tuple[str, ...] = ("HFS", "FFS")  # supine
    max_axial_angle_deg: float = 10.0  # slice normal within this of the body axis
    # first_last (the paper), first_second, or all: a long manifest with every CT (see README)
    timepoints: Literal["first_last", "first_second", "all"] = "first_last"
    min_interval_days: int = 30  # a pair of CTs closer than this is no follow-up
    pft_window_days: int = 90  # each CT takes the nearest test within this many days
    require_pft: bool = True  # false: CTs without a near test are kept, PFT values left empty
    pft_columns: PFTColumns = field(default_factory=PFTColumns)
    pseudonym: Literal["hash", "sequence"] = "hash"  # P + keyed hash, or P0001, P0002, ...
    files_per_task: int = 500  # files whose headers one Dask task reads
    # the key file (pseudonyms and the private side: export paths, original UIDs); what
    # --key gives discover, run, validate and export when the option is left out
    key: Path | None = None

    def validate(self, where: str) -> None:
        if not self.min_extent_mm >= 0:
            raise ConfigError(f"{where}.min_extent_mm must be >= 0, got {self.min_extent_mm}")
        if not self.max_slice_thickness_mm > 0:
            raise ConfigError(
                f"{where}.max_slice_thickness_mm must be > 0, got {self.max_slice_thickness_mm}"
            )
        if not 0 <= self.max_axial_angle_deg < 90:
            raise ConfigError(f"{where}.max_axial_angle_deg must be within [0, 90)")
        for name in (
            "lung_kernels",
            "extra_lung_kernels",
            "contrast_patterns",
            "expiratory_patterns",
        ):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"{where}.{name}[{i}]: {pattern!r} is not a regular expression: {exc}"
                    ) from None
        for name in ("min_interval_days", "pft_window_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if self.files_per_task < 1:
            raise ConfigError(f"{where}.files_per_task must be >= 1, got {self.files_per_task}")
        if not self.patient_positions:
            raise ConfigError(f"{where}.patient_positions must name at least one position")
        self.pft_columns.validate(f"{where}.pft_columns")

    def kernel_regex(self) -> re.Pattern:
        """One case-insensitive full-match pattern for every lung kernel name."""
        alts = "|".join(f"(?:{p})" for p in (*self.lung_kernels, *self.extra_lung_kernels))
        return re.compile(f"(?:{alts})" if alts else r"(?!)", re.IGNORECASE)

    def is_lung_kernel(self, kernel: str) -> bool:
        return bool(kernel) and self.kernel_regex().fullmatch(kernel.strip()) is not None
