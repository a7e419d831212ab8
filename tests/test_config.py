from pathlib import Path

import pytest

from sscflow.config import Config, config_from_dict, load_config
from sscflow.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "cohort.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_cohort_config_resolves_paths_against_its_folder():
    cfg = load_config(CONFIGS / "cohort.yaml")
    assert cfg.manifest == (CONFIGS.parent / "data" / "manifest.csv").resolve()
    assert cfg.store == str((CONFIGS.parent / "data" / "cohort.zarr").resolve())
    assert cfg.ingest.spacing_mm == 1.0


def test_defaults_and_values():
    cfg = config_from_dict({"ingest": {"spacing_mm": 2}, "cluster": {"n_workers": 3}})
    assert cfg.ingest.spacing_mm == 2.0 and isinstance(cfg.ingest.spacing_mm, float)
    assert cfg.cluster.n_workers == 3
    assert cfg.cluster.dashboard_address.startswith("127.0.0.1")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"cluster": {"n_worker": 2}}, r"unknown key 'cluster\.n_worker'"),
        ({"bogus": 1}, r"unknown key 'bogus'"),
        (
            {"cluster": {"n_workers": "two"}},
            r"'cluster\.n_workers' must be an integer, got a string",
        ),
        ({"cluster": {"n_workers": 2.5}}, r"'cluster\.n_workers' must be an integer"),
        ({"ingest": {"spacing_mm": "1mm"}}, r"'ingest\.spacing_mm' must be a number"),
        ({"synth": {"ribs": "yes"}}, r"'synth\.ribs' must be true or false"),
        ({"cluster": [1, 2]}, r"cluster must be a mapping, got a list"),
        ({"ingest": {"spacing_mm": 0}}, r"ingest\.spacing_mm must be within"),
        ({"cluster": {"n_workers": 0}}, r"cluster\.n_workers must be >= 1"),
        ({"segment": {"airway_threshold_hu": -300}}, r"segment\.airway_threshold_hu"),
    ],
)
def test_bad_config_names_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data, source="x.yaml")


def test_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("cluster:\n  threads: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'cluster\.threads'"):
        load_config(p)
    p.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        config_from_dict({"nope": 1})


def test_cohort_example_lists_the_defaults():
    """configs/cohort.yaml documents every section with the code's defaults: they must agree."""
    from sscflow.config import (
        ClassifierConfig,
        ClusterConfig,
        IngestConfig,
        JacobianConfig,
        RegistrationConfig,
        SegmentConfig,
        TemplateConfig,
    )

    cfg = load_config(CONFIGS / "cohort.yaml")
    assert cfg.template == TemplateConfig()
    assert cfg.classifier == ClassifierConfig()
    assert cfg.registration == RegistrationConfig()
    assert cfg.jacobian == JacobianConfig()
    assert cfg.segment == SegmentConfig()
    assert cfg.cluster == ClusterConfig()
    assert cfg.ingest == IngestConfig()
    from sscflow.discover.settings import DiscoverConfig

    assert cfg.discover == DiscoverConfig()
