"""Pseudonyms: the manifest never carries a DICOM PatientID.

A pseudonym is ``P`` + the first 12 hex digits of HMAC-SHA256(secret, PatientID) (``hash``), or
``P0001``, ``P0002``, ... (``sequence``, numbered in the order of the keyed hash, never of the
PatientID). The secret and the link pseudonym -> PatientID live in a key file the user names,
outside the cohort and the store, readable by its owner only; the next discover reads it back,
so pseudonyms stay the same across runs.

The key file is also the *private side* of a discovered cohort: the link from each keyed series
reference in ``manifest.csv`` (``key:<keyed SeriesInstanceUID>``) back to the export (the series
folder, its original Study and Series Instance UIDs), and from each keyed file reference in
``excluded.csv`` back to the file. Nothing in the cohort folder names a path of the export or an
original UID; ``sscflow run`` / ``validate`` resolve the references with ``--key`` (or
``discover.key``).

Keyed UIDs (:meth:`PseudonymKey.uid`) are ``2.25.<integer>``: the integer of a UUID (version 8,
RFC 9562) made of HMAC-SHA256(secret, original UID). The same UID and key give the same keyed UID,
so a patient's studies and series keep their relations; without the key it does not lead back.
A 2.25 root (ITU-T X.667, DICOM PS3.5 B.2) needs no registration.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from sscflow.errors import SscflowError

KEY_FORMAT = "sscflow-pseudonym-key/1"
REF_PREFIX = "key:"  # a manifest scan resolved through the key file's private side


class KeyFileError(SscflowError, ValueError):
    """The key file is misplaced, readable by others, or not an sscflow key file."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


class PseudonymKey:
    """The secret and the links, loaded from (or created for) one key file."""

    def __init__(self, path: Path, scheme: str | None, secret: bytes, links: dict[str, str],
                 series: dict | None = None, files: dict | None = None):  # fmt: skip
        self.path, self.scheme, self.secret = path, scheme, secret
        self.links = dict(links)  # pseudonym -> PatientID
        self.series = dict(series or {})  # keyed series UID -> {folder, series_uid, study_uid}
        self.files = dict(files or {})  # keyed file reference -> path
        self._by_id = {v: k for k, v in self.links.items()}

    @classmethod
    def open(cls, path: str | os.PathLike, *, scheme: str | None, forbidden=(),
             must_exist: bool = False) -> PseudonymKey:  # fmt: skip
        """Load the key file, or start a new one (written by :meth:`save`).

        ``forbidden`` are folders (the cohort, the store) the key file may not lie in.
        ``scheme`` None (reading the private side) accepts either scheme; ``must_exist``
        refuses a missing file rather than starting a new one.
        """
        path = Path(path).expanduser()
        for folder in forbidden:
            if folder is not None and _inside(path, Path(folder)):
                raise KeyFileError(
                    f"key file {path} lies inside {folder}: keep the link between "
                    "pseudonyms and PatientIDs outside the cohort and the store "
                    "(e.g. --key ~/sscflow-keys/cohort.key)"
                )
        if not path.exists():
            if must_exist:
                raise KeyFileError(f"key file {path} does not exist; give the --key file that "
                                   "'sscflow discover' wrote for this cohort")  # fmt: skip
            return cls(path, scheme, secrets.token_bytes(32), {})
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            assert doc["format"] == KEY_FORMAT
            secret, links, old = bytes.fromhex(doc["secret"]), doc["links"], doc["scheme"]
            series, files = dict(doc.get("series", {})), dict(doc.get("files", {}))
        except (ValueError, KeyError, TypeError, AssertionError):
            raise KeyFileError(
                f"{path} is not an sscflow pseudonym key file; give another "
                "--key path (a new one is created)"
            ) from None
        if scheme is not None and old != scheme:
            raise KeyFileError(
                f"key file {path} holds '{old}' pseudonyms but "
                f"discover.pseudonym is '{scheme}'; keep one scheme per key"
            )
        return cls(path, old if scheme is None else scheme, secret, links, series, files)

    def _digest(self, patient_id: str) -> str:
        return hmac.new(self.secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def uid(self, original: str) -> str:
        """The keyed UID of ``original`` (a Study, Series, SOP Instance or Frame of Reference
        UID): ``2.25.`` and the integer of a version-8 UUID from HMAC-SHA256(secret, UID)."""
        return keyed_uid(self.secret, original)

    def date_shift_days(self, patient_id: str) -> int:
        """A per-patient shift of dates, from the key: -(365 ... 3650) days. Every date of one
        patient moves by the same amount, so intervals are kept (PS3.15 'Retain Longitudinal
        Temporal Information with Modified Dates'); the real date never leaves the key's side."""
        return date_shift_days(self.secret, patient_id)

    def file_ref(self, path: str) -> str:
        """A keyed reference (``F`` + 12 hex digits) for a file of the export; the path is kept
        in :attr:`files`."""
        digest = hmac.new(self.secret, b"file:" + path.encode("utf-8"), hashlib.sha256)
        ref = "F" + digest.hexdigest()[:12]
        self.files[ref] = path
        return ref

    def link_series(self, folder: str, series_uid: str, study_uid: str) -> str:
        """Record where a series lies in the export; returns its keyed SeriesInstanceUID."""
        keyed = self.uid(series_uid)
        self.series[keyed] = {"folder": folder, "series_uid": series_uid, "study_uid": study_uid}
        return keyed

    def resolve(self, ref: str) -> dict | None:
        """The private side of a ``key:<keyed series UID>`` reference (None if unknown)."""
        return self.series.get(ref[len(REF_PREFIX):] if ref.startswith(REF_PREFIX) else ref)

    def assign(self, patient_ids) -> dict[str, str]:
        """PatientID -> pseudonym for every id; new ones are added to the links."""
        new = sorted({p for p in patient_ids if p not in self._by_id}, key=self._digest)
        n = len(self.links)
        for pid in new:
            if self.scheme == "sequence":
                n += 1
                pseudo = f"P{n:04d}"
            else:
                pseudo = "P" + self._digest(pid)[:12]
            if pseudo in self.links:  # 48 bits: a collision means a corrupt key file
                raise KeyFileError(f"key file {self.path}: pseudonym {pseudo} already taken")
            self.links[pseudo] = pid
            self._by_id[pid] = pseudo
        return {p: self._by_id[p] for p in patient_ids}

    def save(self) -> None:
        """Write the key file atomically with mode 600 (owner read/write only)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": KEY_FORMAT,
            "scheme": self.scheme,
            "secret": self.secret.hex(),
            "links": dict(sorted(self.links.items())),
            "series": dict(sorted(self.series.items())),
            "files": dict(sorted(self.files.items())),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


def keyed_uid(secret: bytes, original: str) -> str:
    """``2.25.<int>``: a version-8 UUID (RFC 9562) from HMAC-SHA256(secret, ``original``)."""
    b = bytearray(hmac.new(secret, b"uid:" + original.encode("ascii", "replace"),
                           hashlib.sha256).digest()[:16])  # fmt: skip
    b[6] = (b[6] & 0x0F) | 0x80  # version 8
    b[8] = (b[8] & 0x3F) | 0x80  # RFC variant
    return f"2.25.{int.from_bytes(bytes(b), 'big')}"


def open_private_side(key, *, manifest=None, store=None) -> PseudonymKey | None:
    """The key file named by ``--key`` (or ``discover.key``), opened to read the private side
    of a discovered cohort; refused inside the cohort folder (the manifest's) or the store.
    None without ``key``."""
    if key is None:
        return None
    forbidden = [Path(manifest).parent] if manifest is not None else []
    if store is not None and "://" not in str(store):
        forbidden.append(Path(store))
    return PseudonymKey.open(key, scheme=None, forbidden=forbidden, must_exist=True)


def date_shift_days(secret: bytes, patient_id: str) -> int:
    """-(365 + HMAC-SHA256(secret, PatientID) mod 3286) days: 1 to 10 years back."""
    digest = hmac.new(secret, b"date:" + patient_id.encode("utf-8"), hashlib.sha256).digest()
    return -(365 + int.from_bytes(digest[:8], "big") % 3286)


def shift_date(yyyymmdd: str, days: int) -> str:
    """A DICOM DA value moved by ``days`` ('' stays '')."""
    import datetime

    if not yyyymmdd:
        return ""
    d = datetime.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    return (d + datetime.timedelta(days=days)).strftime("%Y%m%d")
