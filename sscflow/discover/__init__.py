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

__all__ = ["discover", "DiscoverConfig"]


def __getattr__(name):  # lazy: sscflow.config imports the settings module alone
    if name == "discover":
        from sscflow.discover.run import discover

        return discover
    if name == "DiscoverConfig":
        from sscflow.discover.settings import DiscoverConfig

        return DiscoverConfig
    raise AttributeError(name)
