"""A discovered cohort carries no identifier: the export's folder names (names, IDs, dates) and
its original UIDs stay on the private side, in the key file; text is decoded with the DICOM
character set; keyed UIDs are stable with the key.

The export is laid out as PACS exports are (``<Name>_<ID>/<date>_<description>/<n>_<desc>``),
with vendor-style UIDs that carry a scanner serial and the acquisition date and time.
"""

from __future__ import annotations

import json
import os
import stat
import uuid

import pandas as pd
import pytest
from discover_tree import Export, patient, study

from sscflow.cli import main
from sscflow.cohort import PrivateSideError, read_manifest
from sscflow.discover.headers import read_header
from sscflow.discover.pseudonym import KeyFileError, PseudonymKey, keyed_uid
from sscflow.discover.run import discover
from sscflow.discover.settings import DiscoverConfig

CFG = DiscoverConfig(min_extent_mm=20.0, require_pft=False)
SERIAL = "20571"  # the scanner serial a vendor puts in its UIDs


def vendor_uid(stamp: str, n: int) -> str:
    """Siemens-style: 1.3.12.2.1107.5.1.4.<serial>.3000000<yymmddhhmmss><counter>."""
    return f"1.3.12.2.1107.5.1.4.{SERIAL}.3000000{stamp}{n:06d}"


# PatientID, name, the folder written for it, character set, (study date, time) per study
PATIENTS = {
    "utf8": ("Müller-Ørsted", "Müller^Jörg", "ISO_IR 192",
             [("20190110", "0915"), ("20200305", "1402")]),
    "latin1": ("Lefèvre-4471", "Lefèvre^Zoé", "ISO_IR 100",
               [("20180221", "1107"), ("20190830", "0833"), ("20210112", "1645")]),
    "ascii": ("QX-772913", "Kowalczyk^Bartosz", None, [("20170704", "1020"), ("20181119", "1155")]),
}  # fmt: skip


def build(root) -> tuple[Export, list[str]]:
    """The export and every identifier it holds (IDs, names and parts, dates, UIDs)."""
    ex = Export(root)
    ids = []
    for tag, (pid, name, charset, studies) in PATIENTS.items():
        who = {**patient(pid, birth="19510423", sex="F"), "PatientName": name}
        if charset:
            who["SpecificCharacterSet"] = charset
        ids += [pid, name, *name.split("^"), "19510423"]
        for k, (date, time) in enumerate(studies):
            st = {**study(f"{tag}{k}", date), "StudyTime": time}
            st["StudyInstanceUID"] = vendor_uid(date[2:] + time + "00", 1)
            uid = vendor_uid(date[2:] + time + "12", 2 + k)
            folder = f"{name.replace('^', '_')}_{pid}/{date}_Thorax/{k + 2}_Lung_B60f"
            ex.series(f"{tag}{k}", folder, patient=who, study=st, uid=uid, number=k + 2)
            ids += [date, st["StudyInstanceUID"], uid, st["AccessionNumber"]]
    return ex, ids


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    work = tmp_path_factory.mktemp("private")
    ex, ids = build(work / "export")
    key = work / "keys" / "cohort.key"
    res = discover(ex.root, work / "cohort", key=key, cfg=CFG)
    return work, ex, ids, key, res


def _forms(text: str) -> list[bytes]:
    out = []
    for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
        try:
            out.append(text.encode(enc).lower())
        except UnicodeEncodeError:
            pass
    return out


def search(folder, identifiers) -> list[str]:
    """Every (file, identifier) where the identifier occurs in the file's bytes (UTF-8, latin-1
    or UTF-16, any case) or in its name."""
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data, rel = path.read_bytes().lower(), str(path.relative_to(folder)).lower()
        for ident in identifiers:
            if any(f in data for f in _forms(ident)) or ident.lower() in rel:
                hits.append(f"{path.relative_to(folder)}: {ident!r}")
    return hits


def test_the_cohort_folder_carries_no_identifier(cohort):
    work, ex, ids, key, res = cohort
    assert res.n_included == 3
    hits = search(work / "cohort", ids)
    print("identifier search over the cohort folder:", hits or "nothing found")
    assert hits == []
    # the search finds them where they are: the export's files and the key file
    assert search(work / "export", ids)
    assert {i for i in ids if any(i.lower() in h.lower() for h in search(work / "keys", ids))}
    # the manifest's scans are keyed references resolved on the private side
    m = pd.read_csv(res.manifest, dtype=str, keep_default_na=False)
    assert m["baseline"].str.startswith("key:2.25.").all()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keyed_uids_are_stable_consistent_and_need_the_key(cohort, tmp_path):
    work, ex, ids, key, res = cohort
    doc = json.loads(key.read_text(encoding="utf-8"))
    k = PseudonymKey.open(key, scheme=None)
    for keyed, link in doc["series"].items():
        assert keyed == k.uid(link["series_uid"]) == keyed_uid(k.secret, link["series_uid"])
        assert len(keyed) <= 64 and keyed.startswith("2.25.")
        u = uuid.UUID(int=int(keyed[5:]))
        assert u.version == 8 and u.variant == uuid.RFC_4122
    assert keyed_uid(b"another key" * 3, ex.uids["utf80"]) != k.uid(ex.uids["utf80"])
    # the same study of a patient maps to one keyed UID across its series
    studies = {link["study_uid"] for link in doc["series"].values()}
    assert len({k.uid(s) for s in studies}) == len(studies) == 7
    # discover again with the same key: the same bytes
    before = (work / "cohort" / "manifest.csv").read_bytes()
    discover(ex.root, tmp_path / "again", key=key, cfg=CFG)
    assert (tmp_path / "again" / "manifest.csv").read_bytes() == before


def test_the_same_patient_in_utf8_and_latin1_is_one_pseudonym(tmp_path):
    ex = Export(tmp_path / "export")
    pid = "Müller-Ørsted"
    for k, (charset, date) in enumerate((("ISO_IR 192", "20190110"), ("ISO_IR 100", "20200305"))):
        who = {**patient(pid), "SpecificCharacterSet": charset}
        ex.series(f"s{k}", f"x{k}", patient=who, study=study(f"enc{k}", date))
    raw = [sorted(ex.folders[f"s{k}"].iterdir())[0].read_bytes() for k in (0, 1)]
    assert pid.encode("utf-8") in raw[0] and pid.encode("latin-1") in raw[1]  # two encodings
    res = discover(ex.root, tmp_path / "c", key=tmp_path / "k.key", cfg=CFG)
    links = json.loads((tmp_path / "k.key").read_text(encoding="utf-8"))["links"]
    assert list(links.values()) == [pid] and res.n_included == 1


def test_undecodable_header_text_is_reported_per_file(tmp_path):
    ex = Export(tmp_path / "export")
    who = {**patient("Lefèvre-4471"), "SpecificCharacterSet": "ISO_IR 100"}
    ex.series("s", "x", patient=who, study=study("bad", "20190110"), n=2)
    f = sorted(ex.folders["s"].iterdir())[0]
    data = f.read_bytes()
    f.write_bytes(data.replace(b"ISO_IR 100", b"ISO_IR 192"))  # latin-1 bytes declared UTF-8
    r = read_header(str(f))
    assert r.status == "unreadable"
    assert r.problem == "header text: PatientID is not valid UTF8 (its SpecificCharacterSet)"
    assert read_header(str(sorted(ex.folders["s"].iterdir())[1])).status == "ok"


def test_run_needs_the_private_side(cohort, capsys):
    work, ex, ids, key, res = cohort
    with pytest.raises(PrivateSideError, match=r"pass --key KEYFILE") as err:
        read_manifest(res.manifest)
    assert "\n" not in str(err.value)
    m = read_manifest(res.manifest, key=key, check_files=True)
    folders = {p.baseline for p in m.patients} | {p.followup for p in m.patients}
    assert folders <= {f for f in ex.folders.values()}
    assert {p.baseline_series_uid for p in m.patients} <= set(ex.uids.values())
    assert all(p.describe("baseline").startswith("baseline key:2.25.") for p in m.patients)
    with pytest.raises(KeyFileError, match="lies inside"):
        read_manifest(res.manifest, key=work / "cohort" / "k.key")
    # the CLI: one line naming what to pass; then with --key, valid
    with pytest.raises(SystemExit) as stop:
        main(["validate", str(res.manifest)])
    assert stop.value.code == 1
    said = " ".join(capsys.readouterr().err.split())  # the one line, as the terminal wraps it
    assert said.startswith("error: manifest") and "pass --key KEYFILE" in said, said
    with pytest.raises(SystemExit) as stop:
        main(["validate", str(res.manifest), "--key", str(key)])
    assert stop.value.code == 0
    assert "3 patients, every scan path exists" in " ".join(capsys.readouterr().out.split())


def test_a_moved_export_is_reported_without_its_path(cohort, tmp_path):
    work, ex, ids, key, res = cohort
    copy = tmp_path / "k.key"
    doc = json.loads(key.read_text(encoding="utf-8"))
    for link in doc["series"].values():
        link["folder"] += "-moved"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    m = read_manifest(res.manifest, key=copy, check_files=True, lenient=True)
    assert len(m.rejected) == 3
    text = " ".join(r.message for r in m.rejected)
    assert "the series folder the key file records no longer exists" in text
    assert [i for i in ids if i in text] == [] and str(ex.root) not in text


def test_the_date_shift_keeps_intervals_and_depends_on_key_and_patient():
    from sscflow.discover import DEIDENTIFICATION
    from sscflow.discover.pseudonym import date_shift_days, shift_date

    a, b = b"k" * 32, b"j" * 32
    s = date_shift_days(a, "Müller-Ørsted")
    assert s == date_shift_days(a, "Müller-Ørsted") and -3650 <= s <= -365
    assert len({date_shift_days(a, f"P{i}") for i in range(50)}) > 40
    assert date_shift_days(b, "Müller-Ørsted") != s
    one, two = shift_date("20190110", s), shift_date("20200305", s)
    import datetime

    def days(x):
        return datetime.date(int(x[:4]), int(x[4:6]), int(x[6:]))

    assert (days(two) - days(one)).days == (days("20200305") - days("20190110")).days == 420
    assert one != "20190110" and shift_date("", s) == ""
    assert DEIDENTIFICATION["version"] == 1 and DEIDENTIFICATION["codes"][0][0] == "113100"
