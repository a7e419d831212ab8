"""No patient identifier from DICOM headers or from the export's layout reaches any output.

A small synthetic cohort is written as a PACS-style DICOM export
(``<Name>_<ID>/<StudyDate>_<Description>/<SeriesNumber>_<Description>/``) whose headers carry
each fake patient's own name and ID (ASCII, UTF-8 ``ISO_IR 192`` and latin-1 ``ISO_IR 100``),
and a shared birth date, accession number, institution, referring physician, address and study
dates, with vendor-style dated UIDs (``1.3.12.2.1107.5.1.4.<serial>.3000000<yymmddhhmmss>...``)
and a third study for one patient. The real commands, in subprocesses, then run the user's path:
``sscflow discover`` (with a PFT table), ``sscflow validate --key``, ``sscflow run --key``,
``sscflow status`` and ``sscflow export``; every byte and every name of every file they wrote (the
cohort folder, the store, the results, the export), their captured output, is searched for every
identifier, in UTF-8, latin-1 and UTF-16: case-insensitively, the name's parts
separately, the numbers without their prefixes and the dates in other formats. The search looks
inside what it can open: Zarr metadata JSON (unescaped), Zarr arrays that hold text, zip
archives (torch models), gzip files, base64 ``data:`` URIs (the report's embedded figures) and
PNG text chunks. Controls show that the same search finds the identifiers in the input DICOM
files and in each kind of container it opens.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from sscflow.core.imageio import read_volume, write_dicom_series

N_PATIENTS = 6  # the classifier trains from 6 labelled patients: every output is made
# each patient's own identity: (PatientName, PatientID, SpecificCharacterSet)
WHO = [
    ("Zorvaniek^Qelfimbra", "PID-93817264", None),
    ("Müllerbrandt^Jörgwin", "MÜB-58203946", "ISO_IR 192"),
    ("Lefèvrequin^Zoébalt", "LFÈ-40917735", "ISO_IR 100"),
    ("Ørstedvik^Åsmundra", "ØRS-62750418", "ISO_IR 192"),
    ("Kowalczek^Bartimöz", "KWZ-31840592", "ISO_IR 100"),
    ("Dubrintosz^Xeraphin", "DBX-74291056", None),
]
SERIAL = "40193"  # the scanner serial in the vendor-style UIDs
MIDDLE_DATE = "20231201"  # a third study of the first patient
SPACING = 6.0  # mm, the coarsest synth grid; the lungs still segment

# The fake patient in every DICOM header (the manifest's pseudonyms are SYN001, ...). The letters
# are irregular on purpose: runs such as "qponml" or "wvutsr" (bytes stepping by one) occur by
# chance in the compressed chunks of smooth float32 fields, which the search reads raw.
HEADER = {
    "PatientName": "Zorvaniek^Qelfimbra",
    "PatientID": "PID-93817264",
    "PatientBirthDate": "19471203",
    "OtherPatientIDs": "OPI-71530482",
    "PatientAddress": "17 Rue Vbnqrtx, Jkwmplz",
    "AccessionNumber": "ACC-55019283",
    "InstitutionName": "Hopital Xqzvbnm",
    "ReferringPhysicianName": "Drumwalsk^Oyendiphe",
    "StudyDate": "20230417",  # baseline; the follow-up gets FOLLOWUP_DATE
}
FOLLOWUP_DATE = "20241109"
DATES = {
    "PatientBirthDate": "19471203",
    "StudyDate": HEADER["StudyDate"],
    "followup StudyDate": FOLLOWUP_DATE,
    "middle StudyDate": MIDDLE_DATE,
}


def vendor_uid(date: str, time: str, n: int) -> str:
    return f"1.3.12.2.1107.5.1.4.{SERIAL}.3000000{date[2:]}{time}{n:05d}"


LAYOUTS = ("pacs", "uid", "flat")  # the folder layouts PACS exports come in


def series_of(i: int, layout: str = "pacs") -> list[tuple[str, str, str]]:
    """(which, StudyDate, folder) of patient ``i``'s studies, in the export's ``layout``: ``pacs``
    (``<Name>_<ID>/<StudyDate>_<Description>/<SeriesNumber>_<Description>``), ``uid``
    (``<StudyInstanceUID>/<SeriesInstanceUID>``) or ``flat`` (every file in ``DICOM/``)."""
    name, pid, _ = WHO[i]
    top = f"{name.replace('^', '_')}_{pid}"
    dates = [("baseline", HEADER["StudyDate"])] + ([("middle", MIDDLE_DATE)] if i == 0 else [])
    dates.append(("followup", FOLLOWUP_DATE))
    if layout == "uid":
        uids = [(vendor_uid(d, "101500", 10 * i + k), vendor_uid(d, "101544", 10 * i + k))
                for k, (_, d) in enumerate(dates)]  # fmt: skip
        return [(w, d, f"{a}/{b}") for (w, d), (a, b) in zip(dates, uids, strict=True)]
    if layout == "flat":
        return [(w, d, "DICOM") for w, d in dates]
    return [(w, d, f"{top}/{d}_Thorax/{k + 2}_Lung_1.0") for k, (w, d) in enumerate(dates)]


def export_identifiers() -> dict[str, list[str]]:
    """Each patient's own identifiers: IDs, names and parts, original UIDs, folder names."""
    out = {}
    for i, (name, pid, _) in enumerate(WHO):
        out[f"PatientName {i}"] = [name, *name.split("^")]
        out[f"PatientID {i}"] = [pid, pid.split("-")[1]]
        uids, folders = [], []
        for k, (_, date, folder) in enumerate(series_of(i)):
            uids += [vendor_uid(date, "101500", 10 * i + k), vendor_uid(date, "101544", 10 * i + k)]
            folders += [f for f in folder.split("/") if "_" in f]
        out[f"UIDs {i}"] = uids + [f"{SERIAL}.3000000{HEADER['StudyDate'][2:]}"]
        out[f"folders {i}"] = sorted(set(folders))
    return out
MONTHS = "January February March April May June July August September October November December"


def _date_forms(yyyymmdd: str) -> list[str]:
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:]
    month = MONTHS.split()[int(m) - 1]
    di = str(int(d))
    return [yyyymmdd, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}", f"{d}/{m}/{y}",
            f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{d}-{m}-{y}", f"{di} {month[:3]} {y}",
            f"{month[:3]} {di}, {y}", f"{month} {di}, {y}", f"{di} {month} {y}"]  # fmt: skip


def needles() -> dict[str, list[str]]:
    """Each identifier and the forms it could take in an output (matched case-insensitively)."""
    out = {
        "PatientName": ["Zorvaniek^Qelfimbra", "Zorvaniek", "Qelfimbra"],
        "PatientID": ["PID-93817264", "93817264"],
        "OtherPatientIDs": ["OPI-71530482", "71530482"],
        "PatientAddress": ["Vbnqrtx", "Jkwmplz"],
        "AccessionNumber": ["ACC-55019283", "55019283"],
        "InstitutionName": ["Hopital Xqzvbnm", "Xqzvbnm"],
        "ReferringPhysicianName": ["Drumwalsk^Oyendiphe", "Drumwalsk", "Oyendiphe"],
    }
    out |= {tag: _date_forms(value) for tag, value in DATES.items()}
    return out | export_identifiers()


# --- the search -------------------------------------------------------------------------------

DATA_URI = re.compile(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=\s]+)")


def _views(path: Path, data: bytes) -> list[tuple[str, bytes]]:
    """The raw bytes and every decoded view the search can open, each with a label."""
    views = [("raw", data)]
    if path.name in ("zarr.json", ".zattrs", ".zgroup", ".zarray") or path.suffix == ".json":
        try:
            views.append(("json", json.dumps(json.loads(data), ensure_ascii=False).encode()))
        except ValueError:
            pass
    if data[:2] == b"\x1f\x8b":
        try:
            views.append(("gzip", gzip.decompress(data)))
        except (OSError, EOFError):
            pass
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                views += [(f"zip:{n}", zf.read(n)) for n in zf.namelist()]
        except zipfile.BadZipFile:
            pass
    for k, m in enumerate(DATA_URI.finditer(data)):
        decoded = base64.b64decode(re.sub(rb"\s", b"", m.group(1)))
        views += [(f"data-uri#{k}/{sub}", v) for sub, v in _views(Path("uri"), decoded)]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        views += _png_text(data)
    return views


def _png_text(data: bytes) -> list[tuple[str, bytes]]:
    """The tEXt / zTXt / iTXt chunks of a PNG, decompressed."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out.append(("png-zTXt", key + b" " + zlib.decompress(rest[1:])))
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            flag, text = rest[0], rest[2:].split(b"\0", 2)[-1]
            out.append(("png-iTXt", key + b" " + (zlib.decompress(text) if flag else text)))
        elif kind == b"tEXt":
            out.append(("png-tEXt", body))
        pos += 12 + n
    return out


def _zarr_text(store: Path) -> list[tuple[str, bytes]]:
    """The values of every Zarr array in ``store`` that holds text (chunks decompressed)."""
    import zarr

    out = []
    for meta in store.rglob("zarr.json"):
        doc = json.loads(meta.read_bytes())
        if doc.get("node_type") != "array":
            continue
        arr = zarr.open_array(str(meta.parent), mode="r")
        if arr.dtype.kind in "biufcmM":  # numbers and datetimes: no text in them
            continue
        values = np.asarray(arr[...]).ravel().tolist()
        out.append((str(meta.parent), "\n".join(map(str, values)).encode("utf-8")))
    return out


def _encoded(form: str) -> list[bytes]:
    """``form`` lower-cased as UTF-8, latin-1 and UTF-16 (both byte orders) would store it."""
    out = []
    for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
        try:
            b = form.lower().encode(enc)
        except UnicodeEncodeError:
            continue
        if b not in out:
            out.append(b)
    return out


def find_identifiers(blobs) -> list[str]:
    """Every (where, identifier, form) found in ``blobs``: an iterable of (label, bytes)."""
    forms = [(tag, f, b) for tag, fs in needles().items() for f in fs for b in _encoded(f)]
    hits = []
    for where, blob in blobs:
        low = blob.lower()
        hits += [f"{where}: {tag} as {form!r}" for tag, form, b in forms if b in low]
    return sorted(set(hits), key=hits.index)


def file_blobs(folder: Path):
    """(label, bytes) for every file under ``folder`` and every view of it the search opens,
    and every file and folder name (its path relative to ``folder``, as UTF-8)."""
    for path in sorted(folder.rglob("*")):
        yield f"name of {path.relative_to(folder)}", str(path.relative_to(folder)).encode()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        for label, view in _views(path, data):
            yield f"{path.relative_to(folder)} [{label}]", view


# --- the cohort ---------------------------------------------------------------------------------


def _tag_headers(folder: Path, study_date: str, who: tuple, uids: tuple) -> None:
    """Put every identifying tag of HEADER, this patient's name and ID in its character set,
    ``study_date`` and the vendor-style (study, series) UIDs into each slice's header."""
    name, pid, charset = who
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if charset:
            ds.SpecificCharacterSet = charset
        for key, value in HEADER.items():
            setattr(ds, key, value)
        ds.PatientName, ds.PatientID, ds.PatientPosition = name, pid, "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids
        for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, key, study_date)
        ds.save_as(f)


def _as_identified_export(synthetic: Path, export: Path, layout: str = "pacs") -> Path:
    """Write every scan of the synthetic cohort into a DICOM export (folders as ``layout``, see
    :func:`series_of`) carrying HEADER and each patient's identity; returns the PFT table
    (PatientID, date, values) for discover."""
    import shutil

    with open(synthetic / "manifest.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    pft = ["patient_id,date,fvc,dlco,tlc,kco"]
    for i, row in enumerate(rows):
        for k, (which, date, folder) in enumerate(series_of(i, layout)):
            image = read_volume(synthetic / row["followup" if which == "followup" else "baseline"])
            uids = (vendor_uid(date, "101500", 10 * i + k), vendor_uid(date, "101544", 10 * i + k))
            staging = export.parent / f".staging-{export.name}" if layout == "flat" else None
            where = staging or export / folder
            write_dicom_series(image, where, patient_id="x", patient_name="x",
                               study_date=date, series_uid=uids[1], study_uid=uids[0],
                               series_number=k + 2)  # fmt: skip
            _tag_headers(where, date, WHO[i], uids)
            if staging:  # one folder for every file: names numbered across the export
                (export / folder).mkdir(parents=True, exist_ok=True)
                for f in sorted(staging.glob("*.dcm")):
                    f.rename(export / folder / f"IM{i:02d}{k:02d}{f.stem[-4:]}.dcm")
                shutil.rmtree(staging)
            values = [row[f"{m}_{'followup' if which == 'followup' else 'baseline'}"]
                      for m in ("fvc", "dlco", "tlc", "kco")]  # fmt: skip
            iso = f"{date[:4]}-{date[4:6]}-{date[6:]}"
            pft.append(",".join([WHO[i][1], iso, *values]))
    path = synthetic.parent / "pft.csv"
    path.write_text("\n".join(pft) + "\n", encoding="utf-8")
    return path


def _sscflow(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=cwd,
                          timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def identified_run(tmp_path_factory):
    """The synthetic cohort as an identified DICOM export, through discover, validate, run,
    status and export, each the real command.

    Returns (work folder, the export, the output folder, the captured logs, the pseudonyms).
    """
    from sscflow.synth import synthesize_cohort

    work = tmp_path_factory.mktemp("deid")
    synthetic, export = work / "synthetic", work / "export"
    synthesize_cohort(N_PATIENTS, synthetic, spacing=SPACING, seed=0)
    pft = _as_identified_export(synthetic, export)
    out, key = work / "out", work / "private" / "cohort.key"
    config = {
        "manifest": str(out / "cohort" / "manifest.csv"),
        "store": str(out / "cohort.zarr"),
        "results": str(out / "results"),
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "ingest": {"spacing_mm": SPACING},
        "segment": {"min_lung_ml": 5.0},
        "classifier": {"epochs": 5, "loader_workers": 0},
        "discover": {"min_extent_mm": 0.0, "max_slice_thickness_mm": 20.0},
    }
    cfg = out / "run.yaml"
    out.mkdir()
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    scratch = out / "tmp"  # Dask's scratch space and any temporary file land here, to be searched
    scratch.mkdir()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(scratch)}  # fmt: skip
    logs = out / "logs"
    logs.mkdir()

    def step(name, *args):
        res = _sscflow(*args, cwd=out, env=env)
        (logs / f"{name}.stdout").write_text(res.stdout + res.stderr, encoding="utf-8")
        assert res.returncode == 0, (name, res.stdout[-3000:] + res.stderr[-3000:])
        return res

    step("discover", "discover", str(export), "--out", str(out / "cohort"), "--key", str(key),
         "--pft", str(pft), "--config", str(cfg))  # fmt: skip
    # the user adds the visual reading (morphologic labels) by pseudonym
    links = {v: k for k, v in json.loads(key.read_text(encoding="utf-8"))["links"].items()}
    visual = {}
    with open(synthetic / "manifest.csv", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            visual[links[WHO[i][1]]] = row["visual"]
    manifest = out / "cohort" / "manifest.csv"
    with open(manifest, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["visual"] = visual[row["patient_id"]]
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    step("validate", "validate", str(cfg), "--key", str(key))
    step("ingest", "ingest", str(manifest), "--store", str(out / "cohort.zarr"), "--key", str(key),
         "--config", str(cfg))  # fmt: skip
    step("run", "--debug", "run", str(cfg), "--key", str(key))
    step("status", "status", str(out / "cohort.zarr"), "--all")
    step("export", "export", str(out / "cohort.zarr"), "--out", str(out / "export"))
    step("export-dicom", "export", str(out / "cohort.zarr"), "--out", str(out / "export_dicom"),
         "--format", "dicom")  # fmt: skip
    return work, export, out, logs, [r["patient_id"] for r in rows]


@pytest.mark.slow
def test_every_output_exists(identified_run):
    """The run made the outputs the search must cover (else an empty search would pass)."""
    _, _, out, _, pseudonyms = identified_run
    store, results = out / "cohort.zarr", out / "results"
    assert len(pseudonyms) == N_PATIENTS  # one patient per PatientID, whatever the encoding
    assert [p for p in (out / "export").rglob("*.nii.gz")]
    for pid in pseudonyms:  # the DICOM export: CT series, SEG and Parametric Map
        assert len(list((out / "export_dicom" / pid / "CT").glob("*.dcm"))) > 10, pid
        assert (out / "export_dicom" / pid / "log_jacobian.PM.dcm").is_file(), pid
    for pid in pseudonyms:
        assert (store / "patients" / pid / "log_jacobian_template" / "zarr.json").is_file(), pid
    assert (store / "group_means" / "zarr.json").is_file()
    assert (results / "patients.csv").is_file()
    assert (results / "report" / "index.html").stat().st_size > 10_000
    assert list((results / "figures").glob("*.png"))
    for target in ("functional", "morphologic"):
        files = [p for p in (results / "classifier" / target).rglob("*") if p.is_file()]
        assert len(files) >= 3, (target, files)
    assert len(list(store.rglob("*"))) > 100


@pytest.mark.slow
def test_the_deidentification_is_recorded_in_the_run_and_the_report(identified_run):
    """Provenance: the run record and the report name the method and its version."""
    import zarr

    from sscflow.discover import DEIDENTIFICATION

    _, _, out, _, _ = identified_run
    run = zarr.open_group(str(out / "cohort.zarr" / "status"), mode="r").attrs["run"]
    assert run["deidentification"]["method"] == DEIDENTIFICATION["method"]
    assert run["deidentification"]["version"] == DEIDENTIFICATION["version"]
    page = (out / "results" / "report" / "index.html").read_text(encoding="utf-8")
    assert "de-identification" in page and "113100" in page


@pytest.mark.slow
def test_no_dicom_identifier_reaches_any_output(identified_run):
    work, _, out, logs, _ = identified_run
    blobs = list(file_blobs(out)) + _zarr_text(out / "cohort.zarr")
    assert len(blobs) > 100
    # the terminal's output (logs/) may name the export: the person running the command sees it
    outputs = [(w, b) for w, b in blobs if "logs" not in w and "run.yaml" not in w]
    hits = find_identifiers(outputs)
    print(f"identifier search over {len(outputs)} files, names and views under the cohort "
          f"folder, store, results, QA pages and export: {hits or 'nothing found'}")
    assert hits == []
    # nor a path of the inputs (the store and the results keep no file paths)
    inputs = [str(work / "synthetic"), str(work / "export"), "synthetic/", "export/Z"]
    assert [(w, p) for w, b in outputs for p in inputs if p.encode() in b] == []
    # nothing sscflow wrote lies elsewhere: beside the inputs there is only the private side
    written = {p.name for p in work.iterdir()}
    assert written == {"synthetic", "export", "pft.csv", "out", "private"}
    assert find_identifiers(file_blobs(work / "private"))  # where the link back lives


@pytest.mark.slow
def test_control_the_search_finds_the_identifiers_in_the_input_dicom(identified_run):
    """The inputs hold every identifier, so a search that found nothing above could fail."""
    _, dicom, _, _, _ = identified_run
    one_slice = sorted((dicom / series_of(0)[0][2]).glob("*.dcm"))[0]
    ds = pydicom.dcmread(one_slice)
    assert str(ds.PatientName) == HEADER["PatientName"] and ds.PatientID == HEADER["PatientID"]
    hits = find_identifiers([("slice", one_slice.read_bytes())])
    found = {h.split(": ", 1)[1].split(" as ")[0] for h in hits}
    assert found >= set(HEADER) and "UIDs 0" in found
    for i in (1, 2):  # the UTF-8 and the latin-1 names, as their files store them
        f = sorted((dicom / series_of(i)[0][2]).glob("*.dcm"))[0]
        raw = f.read_bytes()
        assert WHO[i][0].encode("utf-8" if i == 1 else "latin-1") in raw
        assert any(f"PatientName {i}" in h for h in find_identifiers([("s", raw)]))
    names = find_identifiers(file_blobs(dicom))
    assert any(h.startswith("name of ") and "folders 2" in h for h in names)
    # every form found in raw DICOM bytes: the name, the parts, the ID, the date as stored
    for form in ("Zorvaniek^Qelfimbra", "Zorvaniek", "Qelfimbra", "PID-93817264", "19471203",
                 "ACC-55019283", "Hopital Xqzvbnm", "Drumwalsk^Oyendiphe", "20230417"):  # fmt: skip
        assert any(repr(form) in h for h in hits), form
    assert len(find_identifiers(file_blobs(dicom))) > 100


def test_control_the_search_opens_every_container(tmp_path):
    """Each way an identifier could hide in an output is found: other case, other date format,
    JSON-escaped in zarr.json, zipped, gzipped, in a base64 data URI, in a PNG text chunk."""
    png = b"\x89PNG\r\n\x1a\n"
    text = b"Comment\0\0" + zlib.compress(b"seen at Hopital XQZVBNM")
    png += len(text).to_bytes(4, "big") + b"zTXt" + text + b"\0\0\0\0"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"patient ACC-55019283 " * 50)
    files = {
        "a/notes.txt": b"born 03/12/1947",
        "b/zarr.json": b'{"attributes": {"who": "\\u005aORVANIEK"}}',
        "c/model.pt": zbuf.getvalue(),
        "d/table.csv.gz": gzip.compress(b"id,name\n1,qelfimbra\n"),
        "e/index.html": b'<img src="data:image/png;base64,' + base64.b64encode(png) + b'">',
        "f/figure.png": png,
        "g/log.txt": b"by DRUMWALSK, Apr 17, 2023 and Nov 9, 2024 (93817264, OPI-71530482)",
        "h/addr.txt": b"17 rue vbnqrtx",
        "i/clean.txt": b"SYN001 1947 12 03 Hopital PID- ACC-",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(data)
    hits = find_identifiers(file_blobs(tmp_path))
    where = {h.split(" [")[0].split("/")[0] for h in hits}
    assert where == set("abcdefgh"), hits
    for form in (f for forms in needles().values() for f in forms):
        codes = [ord(c) for c in form.lower() if c.isalpha()]
        steps = [b - a for a, b in zip(codes, codes[1:], strict=False)]
        assert not any(
            x == y == z and abs(x) == 1
            for x, y, z in zip(steps, steps[1:], steps[2:], strict=False)
        ), form
    for tag in ("PatientBirthDate", "PatientName", "AccessionNumber", "InstitutionName",
                "ReferringPhysicianName", "StudyDate", "followup StudyDate", "PatientID",
                "OtherPatientIDs", "PatientAddress"):  # fmt: skip
        assert any(f": {tag} as " in h for h in hits), tag
    assert any("[data-uri#0/png-zTXt]" in h for h in hits), hits


def test_discover_finds_the_same_series_in_every_export_layout(tmp_path):
    """The same scans exported by name, ID and date, by UID and flat (every file in one folder)
    give discover the same cohort: the same manifest, byte for byte, with one key; the private
    side points each series at its folder in that layout."""
    from sscflow.discover import DiscoverConfig, discover
    from sscflow.discover.pseudonym import PseudonymKey
    from sscflow.synth import synthesize_cohort

    synthetic = tmp_path / "synthetic"
    synthesize_cohort(2, synthetic, spacing=SPACING, seed=0, ribs=False)
    key = tmp_path / "private" / "cohort.key"
    cfg = DiscoverConfig(min_extent_mm=0.0, max_slice_thickness_mm=20.0)
    manifests, folders = {}, {}
    for layout in LAYOUTS:
        export = tmp_path / f"export-{layout}"
        pft = _as_identified_export(synthetic, export, layout)
        res = discover(export, tmp_path / f"cohort-{layout}", key=key, cfg=cfg, pft=pft)
        manifest = tmp_path / f"cohort-{layout}" / "manifest.csv"
        manifests[layout] = manifest.read_text(encoding="utf-8")
        private = PseudonymKey.open(key, scheme=None, must_exist=True)
        with open(tmp_path / f"cohort-{layout}" / "manifest.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        folders[layout] = sorted(private.resolve(r[c])["folder"] for r in rows
                                 for c in ("baseline", "followup"))  # fmt: skip
        assert len(rows) == 2 and res is not None, layout
    # a discovered manifest needs its private side at ingest too
    manifest, env = tmp_path / "cohort-flat" / "manifest.csv", {**os.environ, "COLUMNS": "250"}
    res = _sscflow("ingest", str(manifest), "--store", str(tmp_path / "s.zarr"), cwd=tmp_path,
                   env=env)  # fmt: skip
    assert res.returncode == 1 and "--key" in res.stdout + res.stderr, res.stdout + res.stderr
    inside = tmp_path / "cohort-flat" / "cohort.key"
    inside.write_bytes(key.read_bytes())
    res = _sscflow("ingest", str(manifest), "--store", str(tmp_path / "s.zarr"), "--key",
                   str(inside), cwd=tmp_path, env=env)  # fmt: skip
    assert res.returncode == 1 and "lies inside" in " ".join((res.stdout + res.stderr).split())
    assert manifests["uid"] == manifests["pacs"] and manifests["flat"] == manifests["pacs"]
    expected = {layout: sorted({f for i in range(2) for w, _, f in series_of(i, layout)
                                if w != "middle"}) for layout in LAYOUTS}  # fmt: skip
    for layout in LAYOUTS:
        got = sorted({os.path.relpath(f, tmp_path / f"export-{layout}") if os.path.isabs(f)
                      else f for f in folders[layout]})  # fmt: skip
        assert got == expected[layout], (layout, got)
