"""From a DICOM export to a cohort: ``sscflow discover``.

Reads DICOM headers only (never pixel data), in parallel on Dask; checks every series; picks the
best series per study and, per patient, the oldest and the most recent eligible CT; joins the
pulmonary function tests within a window; pseudonymises; writes ``manifest.csv``,
``excluded.csv`` and the inclusion flowchart. Modules:

- :mod:`~sscflow.discover.settings` the ``discover:`` config section and its defaults
- :mod:`~sscflow.discover.headers` reading headers (one Dask task per batch of files)
- :mod:`~sscflow.discover.slices` slice layout checks (also used by ingest)
- :mod:`~sscflow.discover.series` per-series rules
- :mod:`~sscflow.discover.select` studies, PFT join, the pair per patient
- :mod:`~sscflow.discover.pft` the PFT table
- :mod:`~sscflow.discover.pseudonym` pseudonyms and the key file
- :mod:`~sscflow.discover.flowchart` flowchart.json and flowchart.png
- :mod:`~sscflow.discover.run` :func:`discover`, the whole command as a function
- :mod:`~sscflow.discover.synthetic` writing synthetic DICOM exports (tests, benchmark)
"""

__all__ = ["discover", "DiscoverConfig", "DEIDENTIFICATION"]  # noqa: F822 (lazy: __getattr__)

# What sscflow does to de-identify, for the store's run record and the report (provenance).
# The codes are DICOM CID 7050 (De-identification Method), as a DICOM object would carry them.
DEIDENTIFICATION = {
    "method": "sscflow discover: pseudonyms, keyed UIDs, intervals (or keyed date shift)",
    "version": 1,
    "pseudonyms": "P + HMAC-SHA256(key, PatientID) (or P0001... in keyed-hash order)",
    "uids": "2.25 + UUIDv8 from HMAC-SHA256(key, original UID)",
    "dates": "intervals only; where a date is needed, a keyed per-patient shift",
    "private_side": "the key file: PatientIDs, export folders, original UIDs",
    "codes": [
        ("113100", "DCM", "Basic Application Confidentiality Profile"),
        ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
        ("113108", "DCM", "Retain Patient Characteristics Option"),
    ],
}


def __getattr__(name):  # lazy: sscflow.config imports the settings module alone
    if name == "discover":
        from sscflow.discover.run import discover

        return discover
    if name == "DiscoverConfig":
        from sscflow.discover.settings import DiscoverConfig

        return DiscoverConfig
    raise AttributeError(name)
