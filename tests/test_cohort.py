import pandas as pd
import pytest

from sscflow.cohort import functional_label, read_manifest
from sscflow.errors import ManifestError, MissingInputError

HEADER = (
    "patient_id,baseline,followup,fvc_baseline,fvc_followup,dlco_baseline,dlco_followup,visual\n"
)


def write(tmp_path, text, name="manifest.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_reads_and_resolves_relative_paths(tmp_path):
    (tmp_path / "abs").mkdir()
    p = write(
        tmp_path,
        HEADER + f"P1,a/b.nii.gz,{tmp_path}/abs/f.mha,80,70,60,50,Worsened\n"
        "P2,b.nii.gz,f.nii.gz,,,,,\n",
    )
    m = read_manifest(p)
    assert [x.patient_id for x in m.patients] == ["P1", "P2"]
    assert m.patients[0].baseline == tmp_path / "a" / "b.nii.gz"
    assert m.patients[0].followup == tmp_path / "abs" / "f.mha"
    assert m.patients[0].clinical["visual"] == "worsened"
    assert m.patients[1].clinical == {}
    table = m.table()
    assert table.loc["P1", "delta_fvc"] == -10.0
    assert table.loc["P1", "functional"] == "worsening"
    assert pd.isna(table.loc["P2", "functional"])


@pytest.mark.parametrize(
    "clinical, expected",
    [
        ({"fvc_baseline": 80, "fvc_followup": 70}, "worsening"),  # exactly 10 points
        ({"fvc_baseline": 80, "fvc_followup": 70.1}, None),  # not enough: DLCO missing
        (
            {"fvc_baseline": 80, "fvc_followup": 70.1, "dlco_baseline": 60, "dlco_followup": 45},
            "worsening",
        ),  # DLCO exactly 15 points
        (
            {"fvc_baseline": 80, "fvc_followup": 70.1, "dlco_baseline": 60, "dlco_followup": 45.1},
            "stable",
        ),
        ({"dlco_baseline": 60, "dlco_followup": 40}, "worsening"),
        (
            {"fvc_baseline": 80, "fvc_followup": 95, "dlco_baseline": 60, "dlco_followup": 70},
            "stable",
        ),  # improvement is not worsening
        ({}, None),
    ],
)
def test_functional_rule(clinical, expected):
    assert functional_label(clinical) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("patient_id,baseline\nP1,a\n", r"missing column: followup"),
        ("patient_id,baseline,followup,fvc\nP1,a,b,1\n", r"unknown column: fvc"),
        (
            HEADER + "P1,a,b,,,,,\nP1,c,d,,,,,\n",
            r"line 3 \(patient P1\), column patient_id: duplicate of line 2",
        ),
        (
            HEADER + "P1,a,b,abc,,,,\n",
            r"line 2 \(patient P1\), column fvc_baseline: 'abc' is not a number",
        ),
        (HEADER + "P1,a,b,900,,,,\n", r"column fvc_baseline: 900 is out of range"),
        (HEADER + "P1,a,b,,,,,better\n", r"column visual: unknown label 'better'"),
        (HEADER + ",a,b,,,,,\n", r"line 2, column patient_id: empty"),
        (HEADER + "P 1/x,a,b,,,,,\n", r"column patient_id: 'P 1/x' must be"),
        (HEADER + "P1,,b,,,,,\n", r"column baseline: empty"),
        (HEADER, r"no patients"),
    ],
)
def test_bad_manifest_names_line_and_column(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(write(tmp_path, text))


def test_all_problems_reported_together(tmp_path):
    p = write(tmp_path, HEADER + "P1,a,b,abc,,,,\nP2,a,b,,,,,nope\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(p)
    assert len(info.value.problems) == 2
    assert "2 problems" in str(info.value)


def test_missing_files_checked_on_request(tmp_path):
    p = write(tmp_path, HEADER + "P1,a.nii.gz,b.nii.gz,,,,,\n")
    read_manifest(p)  # ingest reports missing files per patient
    with pytest.raises(ManifestError, match=r"column baseline: .*a\.nii\.gz does not exist"):
        read_manifest(p, check_files=True)
    with pytest.raises(MissingInputError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")
