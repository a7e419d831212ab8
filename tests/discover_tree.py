"""A synthetic DICOM export for the discover tests: patients, dated studies, many series each.

Pixels are tiny (4x4) unless a volume is given: discover reads headers only. Every series gets a
name (``A1-thin-lung``) whose UID the tests look up in ``Export.uids``.
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sscflow.core.imageio import deterministic_uid
from sscflow.discover.synthetic import stack_positions, write_slices

LUNG, SOFT = "B60f", "B30f"


@dataclass
class Export:
    root: Path
    uids: dict = field(default_factory=dict)  # series name -> SeriesInstanceUID
    folders: dict = field(default_factory=dict)  # series name -> folder

    def series(
        self,
        name,
        folder,
        *,
        patient,
        study,
        n=21,
        spacing=1.0,
        thickness=None,
        kernel=LUNG,
        description="Thorax",
        drop=(),
        duplicate=(),
        shear=(0, 0, 0),
        orientation=(1, 0, 0, 0, 1, 0),
        pixels=None,
        positions=None,
        extra=None,
        number=1,
        uid=None,
    ):
        """Write one series of ``n`` slices; ``drop`` / ``duplicate`` slice indices; ``uid``
        the SeriesInstanceUID (default: made from the name)."""
        uid = uid or deterministic_uid("discover-test", name)
        pos = positions or stack_positions(n, spacing, origin=(-2.0, -2.0, -100.0), shear=shear)
        px = pixels if pixels is not None else [np.full((4, 4), -800, np.int16)] * len(pos)
        keep = [k for k in range(len(pos)) if k not in drop]
        header = {
            **patient,
            **study,
            "SeriesDescription": description,
            "ConvolutionKernel": kernel,
            "SeriesNumber": number,
            "SliceThickness": f"{thickness if thickness is not None else spacing:g}",
            **(extra or {}),
        }
        names = [f"{name}-{k:03d}.dcm" for k in keep]
        paths = write_slices(
            self.root / folder,
            [px[k] for k in keep],
            [pos[k] for k in keep],
            header=header,
            series_uid=uid,
            study_uid=study["StudyInstanceUID"],
            orientation=orientation,
            names=names,
        )
        for k in duplicate:
            shutil.copy(paths[keep.index(k)], self.root / folder / f"{name}-{k:03d}-copy.dcm")
        self.uids[name], self.folders[name] = uid, self.root / folder
        return uid


def patient(pid, *, birth="", sex="", age=""):
    h = {"PatientID": pid, "PatientName": f"Name^{pid}"}
    if birth:
        h["PatientBirthDate"] = birth
    if sex:
        h["PatientSex"] = sex
    if age:
        h["PatientAge"] = age
    return h


def study(name, date):
    return {
        "StudyInstanceUID": deterministic_uid("discover-test-study", name),
        "StudyDate": date,
        "SeriesDate": date,
        "AccessionNumber": f"ACC{zlib.crc32(name.encode()) % 10**6:06d}",
    }
