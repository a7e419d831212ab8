"""Configuration: typed sections loaded from YAML and validated when loaded.

An unknown key, a wrong type or an impossible value is a ``ConfigError`` naming the key
(``cluster.n_workers``) and the file. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sscflow.core.store import is_url
from sscflow.discover.settings import DiscoverConfig
from sscflow.errors import ConfigError
from sscflow.methods.registration import BACKENDS, options_class


@dataclass
class TLSConfig:
    """TLS between this client and an existing scheduler (``tls://`` address).

    All three files or none, PEM: the CA that signed the scheduler's and workers' certificates,
    and this client's certificate and key. With them set, plaintext is refused.
    """

    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    def validate(self, where: str) -> None:
        given = [n for n in ("ca_file", "cert", "key") if getattr(self, n) is not None]
        if given and len(given) != 3:
            missing = sorted({"ca_file", "cert", "key"} - set(given))
            raise ConfigError(f"{where}: TLS needs ca_file, cert and key; missing {missing}")


@dataclass
class KubernetesConfig:
    """``sscflow run --cluster kubernetes``: the DaskCluster that KubeCluster (dask-kubernetes
    operator) creates, or connects to when one of that name exists. Same shape as
    deploy/kubernetes/base: a CPU worker group and a GPU worker group."""

    name: str = "sscflow"
    namespace: str | None = None  # None: the namespace of the current kubectl context
    image: str = "sscflow:0.1.0-cpu"  # scheduler and CPU workers
    gpu_image: str = "sscflow:0.1.0-gpu"
    cpu_workers: int = 4
    gpu_workers: int = 1  # 0: no GPU worker group
    worker_cpu: int = 4  # CPU limit of each worker container = dask --nthreads
    worker_memory: str = "32Gi"  # memory limit of each worker; dask's limit is 90% of it
    data_claim: str | None = "sscflow-data"  # PVC mounted at /data in the workers; None: none
    env_from_secret: str | None = None  # e.g. sscflow-s3: S3 credentials for the workers
    shutdown_on_close: bool = False  # False keeps the cluster for the next (resumed) run

    def validate(self, where: str) -> None:
        _positive(self.cpu_workers, f"{where}.cpu_workers")
        _positive(self.worker_cpu, f"{where}.worker_cpu")
        if self.gpu_workers < 0:
            raise ConfigError(f"{where}.gpu_workers must be >= 0, got {self.gpu_workers}")
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(Mi|Gi)", self.worker_memory):
            raise ConfigError(
                f"{where}.worker_memory must be a quantity in Mi or Gi (e.g. 32Gi), "
                f"got {self.worker_memory!r}"
            )
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name):
            raise ConfigError(f"{where}.name must be a DNS label (a-z, 0-9, -), got {self.name!r}")


@dataclass
class ClusterConfig:
    """Where the work runs. With ``scheduler`` unset, an in-process LocalCluster is started."""

    scheduler: str | None = None  # e.g. tcp://10.0.0.5:8786; None starts a cluster of `kind`
    kind: Literal["local", "kubernetes"] = "local"  # kubernetes: see the kubernetes section
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"  # per worker, e.g. "4GiB"; "auto" divides the machine's memory
    dashboard_address: str = "127.0.0.1:8787"  # ":0" picks a free port
    retries: int = 1  # per task, on worker loss or unexpected error
    # local cluster: one GPU worker per visible CUDA device ("auto"), none (0), or the first N
    gpus: int | Literal["auto"] = "auto"
    # pairs one GPU worker registers at once: "auto" from the device's free memory
    # (sscflow.flow.gpu)
    gpu_slots: int | Literal["auto"] = "auto"
    tls: TLSConfig = field(default_factory=TLSConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def validate(self, where: str) -> None:
        _positive(self.n_workers, f"{where}.n_workers")
        _positive(self.threads_per_worker, f"{where}.threads_per_worker")
        if self.retries < 0:
            raise ConfigError(f"{where}.retries must be >= 0, got {self.retries}")
        if self.gpus != "auto" and self.gpus < 0:
            raise ConfigError(f"{where}.gpus must be auto or >= 0, got {self.gpus}")
        if self.gpu_slots != "auto":
            _positive(self.gpu_slots, f"{where}.gpu_slots")
        self.tls.validate(f"{where}.tls")
        self.kubernetes.validate(f"{where}.kubernetes")


@dataclass
class IngestConfig:
    """How scans are brought onto the canonical grid and stored."""

    spacing_mm: float = 1.0  # isotropic output spacing
    chunk: int = 64  # chunk edge in voxels for stored volumes
    compression_level: int = 3  # Blosc-zstd level, 1 (fast) .. 9 (small)
    interpolator: str = "bspline"  # CT resampling: "bspline" (cubic) or "linear"

    def validate(self, where: str) -> None:
        if self.interpolator not in ("bspline", "linear"):
            raise ConfigError(f"{where}.interpolator must be bspline or linear, got "
                              f"{self.interpolator!r}")  # fmt: skip
        if not 0.2 <= self.spacing_mm <= 10:
            raise ConfigError(
                f"{where}.spacing_mm must be within 0.2..10 mm, got {self.spacing_mm}"
            )
        if not 8 <= self.chunk <= 512:
            raise ConfigError(f"{where}.chunk must be within 8..512 voxels, got {self.chunk}")
        if not 1 <= self.compression_level <= 9:
            raise ConfigError(
                f"{where}.compression_level must be within 1..9, got {self.compression_level}"
            )


@dataclass
class SegmentConfig:
    """Lung masks (sscflow.methods.segment): airways grown from the trachea, left/right lungs, a
    pleural boundary from the chest wall that keeps dense subpleural disease; or the lungmask
    model."""

    lung_threshold_hu: float = -400.0  # aerated lung is below this, soft tissue above
    airway_threshold_hu: float = -950.0  # airway lumen (mean over ~2 mm) below this, or below
    # a higher level from the scan's own trachea where its air reads high
    closing_mm: float = 5.0  # per-lung closing: vessels at the hilum and lung surface
    min_lung_ml: float = 20.0  # smaller air components are dropped
    dense_max_hu: float = 100.0  # dense disease up to this at the pleura stays in the mask
    subpleural_mm: float = 20.0  # how deep under the pleura it is looked for; 0: not at all
    backend: str = "threshold"  # threshold (sscflow.methods.segment) or lungmask (an extra)
    lungmask_weights: str | None = None  # lungmask: a local weights file; never downloaded

    def validate(self, where: str) -> None:
        if not self.airway_threshold_hu < self.lung_threshold_hu:
            raise ConfigError(
                f"{where}.airway_threshold_hu ({self.airway_threshold_hu}) must be below "
                f"{where}.lung_threshold_hu ({self.lung_threshold_hu})"
            )
        if self.closing_mm < 0 or self.min_lung_ml < 0 or self.subpleural_mm < 0:
            raise ConfigError(
                f"{where}.closing_mm, {where}.min_lung_ml and {where}.subpleural_mm must be >= 0"
            )
        if not self.dense_max_hu > self.lung_threshold_hu:
            raise ConfigError(
                f"{where}.dense_max_hu ({self.dense_max_hu}) must be above "
                f"{where}.lung_threshold_hu ({self.lung_threshold_hu})"
            )
        if self.backend not in ("threshold", "lungmask"):
            raise ConfigError(
                f"{where}.backend must be threshold or lungmask, got {self.backend!r}"
            )
        if self.backend == "lungmask" and not self.lungmask_weights:
            raise ConfigError(
                f"{where}.backend: lungmask needs {where}.lungmask_weights, the path of a local "
                'weights file (sscflow never downloads weights; pip install "sscflow[lungmask]")'
            )


@dataclass
class SynthConfig:
    """The synthetic cohort made by ``sscflow synth`` and ``sscflow demo``."""

    patients: int = 24
    spacing_mm: float = 2.5
    seed: int = 0
    noise_hu: float = 20.0
    ribs: bool = True
    acquisitions: bool = True  # each scan its own grid, field of view, direction, position

    def validate(self, where: str) -> None:
        _positive(self.patients, f"{where}.patients")
        if not 0 < self.spacing_mm <= 6:
            raise ConfigError(f"{where}.spacing_mm must be within (0, 6] mm, got {self.spacing_mm}")
        if self.noise_hu < 0:
            raise ConfigError(f"{where}.noise_hu must be >= 0, got {self.noise_hu}")


@dataclass
class JacobianConfig:
    """Log-Jacobian maps: the folding floor, the block size and the summary's percentiles."""

    floor: float = 1e-6  # det J at or below this (folding) is set to it before the log
    chunk: int = 64  # chunk edge of the stored map, voxels (the field is read in its own chunks)
    percentiles: tuple[float, ...] = (5.0, 25.0, 75.0, 95.0)  # reported besides the median

    def validate(self, where: str) -> None:
        if not 0 < self.floor < 1:
            raise ConfigError(f"{where}.floor must be within (0, 1), got {self.floor}")
        if not 8 <= self.chunk <= 512:
            raise ConfigError(f"{where}.chunk must be within 8..512 voxels, got {self.chunk}")
        if not all(0 <= q <= 100 for q in self.percentiles):
            raise ConfigError(
                f"{where}.percentiles must be within 0..100, got {list(self.percentiles)}"
            )


@dataclass
class ZonesConfig:
    """Lung zones on the baseline (see ``sscflow.methods.zones``)."""

    rind_mm: float = 10.0  # depth of the subpleural rind: lung within this of its boundary

    def validate(self, where: str) -> None:
        if not 0 < self.rind_mm <= 100:
            raise ConfigError(f"{where}.rind_mm must be within (0, 100] mm, got {self.rind_mm}")


@dataclass
class StatisticsConfig:
    """What the report's statistics use (correlations, Tables 1 and 2, box plots, zone means).

    ``rate``: ``per_interval`` (the paper: the mean log-Jacobian over the interval between the
    scans, whatever its length) or ``per_year`` (that mean x 12 / months between the scans).
    """

    rate: Literal["per_interval", "per_year"] = "per_interval"

    def validate(self, where: str) -> None:
        if self.rate not in ("per_interval", "per_year"):
            raise ConfigError(f"{where}.rate must be per_interval or per_year, got {self.rate!r}")


@dataclass
class _RegistrationCommon:
    """Follow-up to baseline registration (see ``sscflow.methods.registration``).

    The common keys (``backend``, ``initial_alignment``, ``smooth_mm`` and the pass/fail
    thresholds), then one section per registered backend (``torch``, ``sitk``): that backend's
    own ``Options`` with its own defaults. ``backend`` "auto" is the torch SVF + local NCC
    backend when PyTorch is installed, else the SimpleITK affine + diffeomorphic demons backend.
    Only the chosen backend's section is used, and only it is in the stage's parameters (its
    hash): changing the other's settings redoes nothing.
    """

    backend: str = "auto"  # "auto" (torch when PyTorch is installed, else sitk), or a name
    initial_alignment: str = "lungs"  # "lungs": rigid, from the lung masks; "none"
    smooth_mm: float = 1.0  # Gaussian s.d. on both scans first, >= half a voxel (interpolation)
    # the scan of thinner slices blurred along z to the other's: auto when both scans' headers
    # gave their slice thickness (DICOM, a NIfTI sidecar), true also from the slice spacing
    match_slices: bool | Literal["auto"] = "auto"
    # each scan's blur measured on its own lung outline (along z and in-plane) and the sharper
    # scan blurred to the other's; replaces match_slices where both widths are measured. Off by
    # default: a follow-up cut short and scans resampled on other grids made it worse (README)
    match_resolution: bool = False
    # the baseline filtered, voxel by voxel, as the follow-up was by its resampling onto the
    # baseline grid (cubic B-spline): a blurrier resampled outline read as expansion (README)
    match_interpolation: bool = True
    min_alignment_dice: float = 0.5  # lungs overlapping less after the alignment: the pair fails
    min_lung_coverage: float = 0.8  # baseline lung the follow-up must image, else it fails
    fov_margin_mm: float = 5.0  # the map is NaN within this of the follow-up's imaged edge
    thick_slice_mm: float = 2.5  # scans with thicker source slices are flagged in the summary

    def validate(self, where: str) -> None:
        if self.backend != "auto" and self.backend not in REGISTRATION_BACKENDS:
            raise ConfigError(f"{where}.backend must be one of "
                              f"{', '.join(['auto', *REGISTRATION_BACKENDS])}, got "
                              f"{self.backend!r}")  # fmt: skip
        if self.initial_alignment not in ("lungs", "none"):
            raise ConfigError(f"{where}.initial_alignment must be lungs or none, got "
                              f"{self.initial_alignment!r}")  # fmt: skip
        for key in ("min_alignment_dice", "min_lung_coverage"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key} must be within 0..1, got {getattr(self, key)}")
        if self.smooth_mm < 0:
            raise ConfigError(f"{where}.smooth_mm must be >= 0, got {self.smooth_mm}")
        for key in ("match_resolution", "match_interpolation"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}.{key} must be true or false, got "
                                  f"{getattr(self, key)!r}")  # fmt: skip
        if not 0 <= self.fov_margin_mm <= 50:
            raise ConfigError(f"{where}.fov_margin_mm must be within 0..50 mm, got "
                              f"{self.fov_margin_mm}")  # fmt: skip
        if not self.thick_slice_mm > 0:
            raise ConfigError(f"{where}.thick_slice_mm must be > 0, got {self.thick_slice_mm}")
        for name in REGISTRATION_BACKENDS:
            getattr(self, name).validate(f"{where}.{name}")

    def options(self, backend: str) -> dict:
        """Keyword options for ``register(..., backend=backend)``: the common keys that
        ``register`` takes and the backend's own section, nothing of the other backends'."""
        own = {f.name: getattr(getattr(self, backend), f.name)
               for f in dataclasses.fields(getattr(self, backend))}  # fmt: skip
        d = {"initial_alignment": self.initial_alignment, "smooth_mm": self.smooth_mm,
             "match_slices": self.match_slices, "match_resolution": self.match_resolution,
             "match_interpolation": self.match_interpolation, **own}  # fmt: skip
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    @classmethod
    def moved_key(cls, key: str, keypath: str) -> str | None:
        """Where a key of the old flat section went (``registration.iterations`` ->
        ``registration.torch.iterations``), or None for a key no backend has."""
        where = keypath.rpartition(".")[0]
        owners = [name for name in REGISTRATION_BACKENDS
                  if key in {f.name for f in dataclasses.fields(options_class(name))}]  # fmt: skip
        if not owners:  # a voxel setting of earlier versions: its backend's millimetre key
            found = [(name, *renamed[key]) for name in REGISTRATION_BACKENDS
                     if key in (renamed := getattr(sys.modules[options_class(name).__module__],
                                                   "RENAMED", {}))]  # fmt: skip
            if not found:
                return None
            (name, new, how), *rest = found
            also = "".join(f" (or {where}.{n}.{k})" for n, k, _ in rest)
            return (f"{keypath} moved to {where}.{name}.{new}{also}: {how} (each backend has "
                    "its own section, its sizes in millimetres)")
        first, *rest = (f"{where}.{name}.{key}" for name in owners)
        also = f" (or {', '.join(rest)})" if rest else ""
        return f"{keypath} moved to {first}{also} (each backend has its own section)"


REGISTRATION_BACKENDS = tuple(BACKENDS)

# One section per registered backend, built from its own ``Options`` (its defaults): a backend
# added to sscflow.methods.registration.BACKENDS gets its config section without a line here.
RegistrationConfig = dataclasses.make_dataclass(
    "RegistrationConfig",
    [(name, options_class(name), field(default_factory=options_class(name)))
     for name in REGISTRATION_BACKENDS],  # fmt: skip
    bases=(_RegistrationCommon,),
    namespace={"__module__": __name__, "__doc__": _RegistrationCommon.__doc__},
)

@dataclass
class TemplateConfig:
    """The common space where maps are compared (see ``sscflow.methods.template``).

    Without ``image`` the template is built from the cohort: ``method`` "median" takes the baseline
    whose lung volume is nearest the cohort median; "average" starts there and replaces it
    ``iterations`` times by the mean of all baselines registered to it. ``registration`` is the
    baseline -> template registration (the same code as follow-up -> baseline).
    """

    image: Path | None = None  # a CT image file (any ingest format) used as the template
    lung_mask: Path | None = None  # its lung mask; segmented from the image when omitted
    method: Literal["median", "average"] = "median"
    iterations: int = 2  # "average" only
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def validate(self, where: str) -> None:
        if self.lung_mask is not None and self.image is None:
            raise ConfigError(f"{where}.lung_mask needs {where}.image")
        _positive(self.iterations, f"{where}.iterations")
        self.registration.validate(f"{where}.registration")


@dataclass
class ClassifierConfig:
    """The worsening classifier (see ``sscflow.methods.classify``): a 3D CNN over
    template-space maps.

    Four layers as in the paper: ``channels`` stride-2 3D convolutions (kernel ``kernel``) with
    batch norm and ReLU, then a fully connected layer to two classes; cross-entropy, Adam.
    """

    input_shrink: int = 2  # maps averaged over blocks of this many voxels before the CNN
    channels: tuple[int, ...] = (8, 16, 32)  # one stride-2 conv block per entry (+ 1 FC layer)
    kernel: int = 3
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.2  # patient-level, stratified (the paper: about 19-20%)
    validation_fraction: float = 0.2  # of the learning set
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    loader_workers: int = 2  # DataLoader processes reading maps from the store (0: in-process)

    def validate(self, where: str) -> None:
        _positive(self.input_shrink, f"{where}.input_shrink")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"{where}.channels must be positive counts, got {self.channels}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"{where}.kernel must be an odd number >= 1, got {self.kernel}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be within [0, 1), got {self.dropout}")
        _positive(self.epochs, f"{where}.epochs")
        _positive(self.batch_size, f"{where}.batch_size")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}.learning_rate must be > 0 and weight_decay >= 0")
        for name in ("test_fraction", "validation_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be within (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{where}.device must be auto, cpu or cuda, got {self.device!r}")
        if self.loader_workers < 0:
            raise ConfigError(f"{where}.loader_workers must be >= 0")


@dataclass
class Config:
    """A whole sscflow run. ``manifest`` and ``store`` are paths (or URLs for the store).

    ``results`` is the folder for tables and figures (default: ``results`` beside the store).
    """

    manifest: Path | None = None
    store: str | None = None  # a folder, or later an fsspec URL (s3://bucket/cohort.zarr)
    results: Path | None = None
    # a patient with more than two scans (the manifest's long form): which pairs are registered,
    # "both" (consecutive and first -> last), "consecutive" or "first_last" (sscflow.cohort)
    pairs: str = "both"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    zones: ZonesConfig = field(default_factory=ZonesConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)  # sscflow discover
    source: str = "<defaults>"  # where it was loaded from (not a YAML key)

    def validate(self, where: str = "") -> None:
        if self.pairs not in ("both", "consecutive", "first_last"):
            raise ConfigError(f"pairs must be both, consecutive or first_last, got {self.pairs!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return _plain(d)

    def changed(self) -> dict:
        """The settings that differ from the defaults, nested as in the file (``sscflow
        validate`` prints them; the run record and the report keep them).

        >>> Config().changed()
        {}
        """
        return _changed(self.to_dict(), Config().to_dict())


def _changed(settings: dict, defaults: dict) -> dict:
    """The parts of ``settings`` that differ from ``defaults``, nested as they are."""
    diff = {}
    for key, value in settings.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            sub = _changed(value, default)
            if sub:
                diff[key] = sub
        elif value != default:
            diff[key] = value
    return diff


_NOT_KEYS = {"source"}


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a YAML config. Raises ConfigError naming the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        marks = _marks(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from None
    return config_from_dict(data, source=str(p), base=p.parent, marks=marks)


def config_from_dict(data: Any, *, source: str = "<dict>", base: Path | None = None,
                     marks: dict | None = None) -> Config:  # fmt: skip
    """Build a validated Config from plain data (as parsed from YAML).

    Every problem is collected (unknown keys, wrong types, then each section's impossible
    values) and raised together in one ConfigError, each with its line and column when
    ``marks`` ({keypath: (line, column)}, from the YAML) has them.
    """
    problems: list[tuple[str, str]] = []
    cfg = _build(Config, data, "", problems)
    if cfg is not None:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                try:
                    value.validate(f.name)
                except ConfigError as exc:
                    problems.append((_keypath_of(str(exc), f.name), str(exc)))
    if problems:
        marks = marks or {}
        problems.sort(key=lambda km: _position(km[0], marks))
        lines = [_located(k, m, marks) for k, m in problems]
        if len(lines) == 1:
            raise ConfigError(f"config {source}: {lines[0]}")
        raise ConfigError(f"config {source} has {len(lines)} problems:\n"
                          + "\n".join(f"  - {line}" for line in lines))
    cfg.source = source
    if base is not None:
        if cfg.manifest is not None and not cfg.manifest.is_absolute():
            cfg.manifest = (base / cfg.manifest).resolve()
        if cfg.store is not None and not is_url(cfg.store) and not Path(cfg.store).is_absolute():
            cfg.store = str((base / cfg.store).resolve())
        for name in ("results",):
            value = getattr(cfg, name)
            if value is not None and not value.is_absolute():
                setattr(cfg, name, (base / value).resolve())
        for section, names in ((cfg.template, ("image", "lung_mask")), (cfg.discover, ("key",)),
                               (cfg.cluster.tls, ("ca_file", "cert", "key"))):  # fmt: skip
            for name in names:
                value = getattr(section, name)
                if value is not None and not value.is_absolute():
                    setattr(section, name, (base / value).resolve())
    return cfg


def _marks(node, where: str = "") -> dict:
    """{keypath: (line, column)} (1-based) of every key of a composed YAML mapping."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            keypath = f"{where}.{key.value}" if where else str(key.value)
            out[keypath] = (key.start_mark.line + 1, key.start_mark.column + 1)
            out.update(_marks(value, keypath))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out[f"{where}[{i}]"] = (value.start_mark.line + 1, value.start_mark.column + 1)
    return out


def _keypath_of(message: str, default: str) -> str:
    m = re.match(r"^'?([A-Za-z_][\w.\[\]]*)'?", message)
    return m.group(1) if m else default


def _position(keypath: str, marks: dict) -> tuple[int, int]:
    path = keypath
    while path and path not in marks:  # the nearest key that the file spells out
        path = path.rpartition(".")[0] if "." in path else ""
    return marks.get(path, (0, 0))


def _located(keypath: str, message: str, marks: dict) -> str:
    line, col = _position(keypath, marks)
    return f"line {line}, column {col}: {message}" if line else message


def _build(cls, data, where, problems=None):
    """``cls`` from a mapping; problems go to ``problems`` ((keypath, message)) when given,
    else the first is raised. Returns None when ``data`` is not a mapping."""
    raise_now = problems is None
    problems = [] if problems is None else problems
    if not isinstance(data, dict):
        problems.append((where, f"{where or 'the top level'} must be a mapping, got "
                                f"{_kind(data)}"))  # fmt: skip
        if raise_now:
            raise ConfigError(problems[0][1])
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
    kwargs = {}
    for key, value in data.items():
        keypath = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            moved = cls.moved_key(key, keypath) if hasattr(cls, "moved_key") else None
            problems.append((keypath, moved or f"unknown key '{keypath}' (known keys here: "
                                               f"{known})"))  # fmt: skip
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            sub = _build(hint, value if value is not None else {}, keypath, problems)
            if sub is not None:
                kwargs[key] = sub
            continue
        try:
            kwargs[key] = _coerce(value, hint, keypath)
        except ConfigError as exc:
            problems.append((keypath, str(exc)))
    if raise_now and problems:
        raise ConfigError(problems[0][1])
    return cls(**kwargs)


def _coerce(value, hint, keypath):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, keypath)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, keypath)
            except ConfigError as exc:
                errors.append(str(exc))
        wanted = [_wanted(a) for a in args if a is not type(None)]
        if len(wanted) > 1 and None not in wanted:  # true, false or auto: every choice named
            raise ConfigError(f"'{keypath}' must be {' or '.join(wanted)}, got {_kind(value)} "
                              f"{value!r}")  # fmt: skip
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"'{keypath}' must be one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{keypath}' must be true or false, got {_kind(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{keypath}' must be an integer, got {_kind(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{keypath}' must be a number, got {_kind(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{keypath}' must be a string, got {_kind(value)} {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"'{keypath}' must be a path (a string), got {_kind(value)} {value!r}"
            )
        return Path(value)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"'{keypath}' must be a list, got {_kind(value)} {value!r}")
        items = [_coerce(v, item, f"{keypath}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    raise TypeError(f"config field {keypath}: unsupported annotation {hint}")  # pragma: no cover


def _wanted(hint) -> str | None:
    """What a value of ``hint`` is, for a message (None: no short words for it)."""
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is Literal:
        return " or ".join(str(c) for c in typing.get_args(hint))
    return {int: "an integer", float: "a number", str: "a string"}.get(hint)


def _positive(value, keypath):
    if value < 1:
        raise ConfigError(f"{keypath} must be >= 1, got {value}")


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
