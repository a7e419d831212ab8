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
    p.write_text("cluster:\n  threads: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'cluster\.threads'"):
        load_config(p)
    p.write_text("cluster: [unclosed\n", encoding="utf-8")
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


def test_registration_has_a_section_per_backend_with_its_own_defaults():
    from sscflow.methods.registration import BACKENDS, options_class

    cfg = config_from_dict({"registration": {"backend": "sitk", "sitk": {"iterations": [5, 4, 3]},
                                             "torch": {"window_mm": 14}}})  # fmt: skip
    reg = cfg.registration
    assert reg.sitk.iterations == (5, 4, 3)
    assert reg.sitk.sigma_mm == options_class("sitk")().sigma_mm
    assert reg.torch.window_mm == 14.0 and reg.torch.iterations == (40, 30, 10)
    for name in BACKENDS:  # one section per registered backend, its own Options
        assert type(getattr(reg, name)) is options_class(name)
    # register() gets the common keys and the chosen backend's section, nothing of the other's
    opts = reg.options("sitk")
    assert opts["iterations"] == (5, 4, 3) and opts["initial_alignment"] == "lungs"
    assert "window_mm" not in opts and "device" not in opts
    # the sitk backend's own defaults differ from the torch backend's
    assert config_from_dict({}).registration.options("sitk")["iterations"] == (100, 60, 30)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"registration": {"iterations": [1, 2, 3]}},
         r"registration\.iterations moved to registration\.torch\.iterations "
         r"\(or registration\.sitk\.iterations\)"),
        ({"registration": {"window": 5}}, r"registration\.window moved to registration\.torch"
                                          r"\.window_mm: the local NCC window at the finest "
                                          r"level in mm; 5 at 2 mm is 10 \(each backend"),
        ({"template": {"registration": {"levels": [2]}}},
         r"template\.registration\.levels moved to template\.registration\.torch\.levels_mm "
         r"\(or template\.registration\.sitk\.levels_mm\)"),
        # the voxel settings of earlier versions, inside their backend's section: the new key
        ({"registration": {"torch": {"window": 5}}},
         r"registration\.torch\.window is now registration\.torch\.window_mm \(.*\): settings "
         r"are in millimetres"),
        ({"registration": {"torch": {"velocity_shrink": 2}}},
         r"registration\.torch\.velocity_shrink is now registration\.torch\.velocity_spacing_mm"),
        ({"registration": {"torch": {"learning_rate": 0.6}}},
         r"registration\.torch\.learning_rate is now registration\.torch\.learning_rate_mm"),
        ({"template": {"registration": {"sitk": {"sigma": 2.0}}}},
         r"template\.registration\.sitk\.sigma is now template\.registration\.sitk\.sigma_mm"),
        ({"registration": {"sitk": {"window": 5}}},
         r"unknown key 'registration\.sitk\.window' \(known keys here: affine, "),
        ({"registration": {"colour": 5}}, r"unknown key 'registration\.colour'"),
        ({"registration": {"sitk": {"sigma_mm": "wide"}}},
         r"'registration\.sitk\.sigma_mm' must be a number, got a string"),
        ({"registration": {"torch": {"levels_mm": [4, 2], "iterations": [3]}}},
         r"registration\.torch\.iterations needs one count >= 0 per level \(2\)"),
        ({"registration": {"sitk": {"sigma_mm": 0}}}, r"registration\.sitk\.sigma_mm must be > 0"),
        ({"registration": {"torch": {"levels_mm": [4, 0]}}},
         r"registration\.torch\.levels_mm must be voxel sizes > 0 \(mm\), got \[4\.0, 0\.0\]"),
        ({"registration": {"torch": {"device": "tpu"}}}, r"registration\.torch\.device must be"),
        ({"registration": {"backend": "elastix"}},
         r"registration\.backend must be one of auto, torch, sitk, got 'elastix'"),
    ],
)
def test_registration_section_names_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data, source="x.yaml")


def test_cohort_example_spells_out_every_registration_key():
    """configs/cohort.yaml lists every registration key, each backend's section whole."""
    import dataclasses

    import yaml

    from sscflow.config import RegistrationConfig

    section = yaml.safe_load((CONFIGS / "cohort.yaml").read_text(encoding="utf-8"))["registration"]
    cfg = RegistrationConfig()
    assert set(section) == {f.name for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            assert set(section[f.name]) == {g.name for g in dataclasses.fields(value)}, f.name
