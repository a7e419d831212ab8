"""Pseudonyms: the manifest never carries a DICOM PatientID.

A pseudonym is ``P`` + the first 12 hex digits of HMAC-SHA256(secret, PatientID) (``hash``), or
``P0001``, ``P0002``, ... (``sequence``, numbered in the order of the keyed hash, never of the
PatientID). The secret and the link pseudonym -> PatientID live in a key file the user names,
outside the cohort and the store, readable by its owner only; the next discover reads it back,
so pseudonyms stay the same across runs.
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

    def __init__(self, path: Path, scheme: str, secret: bytes, links: dict[str, str]):
        self.path, self.scheme, self.secret = path, scheme, secret
        self.links = dict(links)  # pseudonym -> PatientID
        self._by_id = {v: k for k, v in self.links.items()}

    @classmethod
    def open(cls, path: str | os.PathLike, *, scheme: str, forbidden=()) -> PseudonymKey:
        """Load the key file, or start a new one (written by :meth:`save`).

        ``forbidden`` are folders (the cohort, the store) the key file may not lie in.
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
        except (ValueError, KeyError, TypeError, AssertionError):
            raise KeyFileError(
                f"{path} is not an sscflow pseudonym key file; give another "
                "--key path (a new one is created)"
            ) from None
        if old != scheme:
            raise KeyFileError(
                f"key file {path} holds '{old}' pseudonyms but "
                f"discover.pseudonym is '{scheme}'; keep one scheme per key"
            )
        return cls(path, scheme, secret, links)

    def _digest(self, patient_id: str) -> str:
        return hmac.new(self.secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()

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
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
