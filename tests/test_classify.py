"""The worsening classifier: model, streamed data, split, training, prediction.

A tiny store of 16^3 maps: noise inside an ellipsoid lung, and for the worsening class a
shrinkage blob (log-Jacobian -0.4) in the posterior-basal corner, so the classes are separable.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from sscflow.config import ClassifierConfig  # noqa: E402
from sscflow.core import store as st  # noqa: E402
from sscflow.core.geometry import Geometry  # noqa: E402
from sscflow.methods.classify import (  # noqa: E402
    MapDataset,
    build_model,
    load_split,
    make_loader,
    predict,
    save_split,
    split_patients,
    targets,
    train,
)

SHAPE = (16, 16, 16)
GEOMETRY = Geometry(SHAPE, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
N = 24  # labelled patients with maps: 12 worsening, 12 stable
NAN_PATIENT = "P001"  # a NaN inside the lung at NAN_VOXEL
NAN_VOXEL = (8, 8, 8)
CONFIG = ClassifierConfig(input_shrink=1, channels=(4, 8, 16), epochs=12, batch_size=4,
                          learning_rate=1e-2, dropout=0.2, seed=0, device="cpu",
                          loader_workers=0)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lung_mask() -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    return ((z / 7.5) ** 2 + (y / 6.5) ** 2 + (x / 7.0) ** 2 <= 1.0).astype(np.uint8)


def patient_map(i: int, worsening: bool) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    m = rng.normal(0.0, 0.05, SHAPE).astype(np.float32)
    m[0] = np.nan  # outside the lung: must read as 0
    if worsening:  # posterior (high y), basal (high z), one side (low x)
        z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
        m[(z - 11) ** 2 + (y - 10) ** 2 + (x - 5) ** 2 <= 9] -= 0.4
    return m


def pid(i: int) -> str:
    return f"P{i:03d}"


def label_of(i: int) -> int:
    return i % 2  # odd patients worsen


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(store path, cohort table): N labelled patients with maps, P100 labelled without a map,
    P101/P102 with maps but no functional label, WRONG with a 12^3 map (not in the table)."""
    path = tmp_path_factory.mktemp("classify") / "cohort.zarr"
    root = st.open_store(path)

    def write(parent, name, data, geometry=GEOMETRY):
        st.write_image(parent, name, data, geometry, stage="test", params={"k": 1},
                       input_hash=f"h-{name}", chunk=8)  # fmt: skip

    write(root.require_group("template"), "lung_mask", lung_mask())
    rows = []
    for i in range(N + 2):
        m = patient_map(i, label_of(i) == 1)
        if pid(i) == NAN_PATIENT:
            m[NAN_VOXEL] = np.nan
        write(st.patient_group(root, pid(i)), "log_jacobian_template", m)
        functional = ("stable", "worsening")[label_of(i)] if i < N else None
        visual = ("improved", "worsened", "stable")[i % 3]
        rows.append({"patient_id": pid(i), "functional": functional, "visual": visual})
    st.patient_group(root, "P100")  # ingested, no map yet
    rows.append({"patient_id": "P100", "functional": "worsening", "visual": None})
    small = Geometry((12, 12, 12), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    write(st.patient_group(root, "WRONG"), "log_jacobian_template",
          np.zeros(small.shape, np.float32), small)  # fmt: skip
    return path, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    path, table = cohort
    out = tmp_path_factory.mktemp("model")
    return out, train(path, table, "functional", CONFIG, out)


def test_import_does_not_load_torch():
    code = "import sys, sscflow, sscflow.methods.classify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         encoding="utf-8", check=True)
    assert out.stdout.strip() == "False"


def test_model_has_four_layers_and_output_shape():
    config = ClassifierConfig(input_shrink=1, channels=(4, 8, 16), kernel=3)
    model = build_model(config, (16, 12, 20))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 3
    assert all(c.stride == (2, 2, 2) and c.padding == (1, 1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == 3
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1  # 16 -> 8 -> 4 -> 2, 12 -> 6 -> 3 -> 2, 20 -> 10 -> 5 -> 3
    assert (linear[0].in_features, linear[0].out_features) == (16 * 2 * 2 * 3, 2)
    model.eval()
    assert tuple(model(torch.zeros(3, 1, 16, 12, 20)).shape) == (3, 2)
    five = build_model(ClassifierConfig(input_shrink=1, channels=(2, 2), kernel=5), (9, 9, 9))
    assert five(torch.zeros(2, 1, 9, 9, 9)).shape == (2, 2)  # padding 2: 9 -> 5 -> 3



def test_items_are_shrunk_to_the_classifier_resolution(cohort, tmp_path):
    """input_shrink 2: each item is the masked map's mean over 2x2x2 blocks (checked against
    numpy block means; 16^3 -> 8^3); the on-disk cache holds the same items, one per row."""
    from sscflow.methods.classify.data import CachedDataset, write_cache

    path, _ = cohort
    full = MapDataset(path, [pid(0), NAN_PATIENT, pid(2)], [0, 1, 0])
    half = MapDataset(path, full.patient_ids, full.labels, shrink=2)
    assert half.item_shape == (8, 8, 8) and half.input_shape == SHAPE
    for i in range(3):
        x = full[i][0][0].numpy()
        blocks = x.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(half[i][0][0].numpy(), blocks, rtol=0, atol=1e-7)
    cache = write_cache(half, tmp_path / "items.npy", workers=2, batch_size=2)
    cached = CachedDataset(cache, [2, 0], [0, 0])
    assert torch.equal(cached[0][0], half[2][0]) and torch.equal(cached[1][0], half[0][0])
    x, y = cached[[1, 0]]  # a batch, as make_loader asks for it
    assert x.shape == (2, 1, 8, 8, 8) and y.tolist() == [0, 0]
    assert torch.equal(x[0], half[0][0]) and torch.equal(x[1], half[2][0])
    batches = list(make_loader(CachedDataset(cache, [0, 1, 2], [0, 1, 0]), 2, False, 0, 0))
    assert [tuple(b[0].shape) for b in batches] == [(2, 1, 8, 8, 8), (1, 1, 8, 8, 8)]
    assert torch.equal(batches[1][0][0], half[2][0]) and batches[0][1].tolist() == [0, 1]
    clone = pickle.loads(pickle.dumps(cached))  # what a worker process receives
    assert clone._array is None and torch.equal(clone[0][0], half[2][0])
    # held in RAM (hold_in_ram, as train does when it fits): the same batches, no processes
    streamed = CachedDataset(cache, [2, 0, 1], [0, 0, 1])
    held = CachedDataset(cache, [2, 0, 1], [0, 0, 1]).load()
    assert held.nbytes == 3 * 8**3 * 4 and held.memory.shape == (3, 8, 8, 8)
    for a, b in zip(make_loader(streamed, 2, True, 3, 2), make_loader(held, 2, True, 3, 2),
                    strict=True):  # fmt: skip
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert make_loader(held, 2, True, 3, 2).num_workers == 0
    # the model takes the shrunk grid: 8 -> 4 -> 2 -> 1
    model = build_model(ClassifierConfig(channels=(4, 8, 16)), half.item_shape)
    assert model.classifier.in_features == 16 and not any(
        isinstance(m, torch.nn.AvgPool3d) for m in model.modules())


def test_targets_labels_and_left_out():
    table = pd.DataFrame({
        "patient_id": ["a", "b", "c", "d", "e"],
        "functional": ["worsening", "stable", None, np.nan, "stable"],
        "visual": ["improved", "stable", "worsened", None, ""],
    })
    f = targets(table, "functional")
    assert f.to_dict() == {"a": 1, "b": 0, "e": 0} and f.dtype == np.int64
    m = targets(table, "morphologic")
    assert m.to_dict() == {"a": 0, "b": 0, "c": 1}  # improved counts as not worsened
    with pytest.raises(ValueError, match="target 'survival' is unknown"):
        targets(table, "survival")
    bad = table.assign(visual=["better", None, None, None, None])
    with pytest.raises(ValueError, match="patient a: visual label 'better' is unknown"):
        targets(bad, "morphologic")


def test_dataset_item_is_the_masked_map(cohort):
    path, _ = cohort
    ds = MapDataset(path, [NAN_PATIENT, pid(2)], [1, 0])
    root = st.open_store(path, "r")
    mask = np.asarray(st.read_image(root["template"], "lung_mask").array[...]) > 0
    assert mask[NAN_VOXEL] and not mask.all()
    for i, p in enumerate(ds.patient_ids):
        raw = np.asarray(st.read_image(st.patient_group(root, p), "log_jacobian_template")
                         .array[...])  # fmt: skip
        x, y = ds[i]
        assert x.dtype == torch.float32 and tuple(x.shape) == (1, *SHAPE)
        assert y.dtype == torch.int64 and int(y) == ds.labels[i]
        expected = np.where(mask & np.isfinite(raw), raw, 0)
        np.testing.assert_array_equal(x[0].numpy(), expected)
        assert np.isfinite(x.numpy()).all() and (x[0].numpy()[~mask] == 0).all()
        assert np.abs(x[0].numpy()[mask]).max() > 0  # the map itself came through
    assert float(ds[0][0][0][NAN_VOXEL]) == 0.0
    clone = pickle.loads(pickle.dumps(ds))  # what a worker process receives: no open store
    assert clone._opened is None
    np.testing.assert_array_equal(clone[1][0].numpy(), ds[1][0].numpy())


def test_loader_with_workers_streams_the_same_batches(cohort):
    path, _ = cohort
    ids = [pid(i) for i in range(10)]
    ds = MapDataset(path, ids, [label_of(i) for i in range(10)])

    def epochs(workers):
        loader = make_loader(ds, 4, True, seed=3, workers=workers)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(2)]

    serial, parallel = epochs(0), epochs(2)
    for e_serial, e_parallel in zip(serial, parallel, strict=True):
        assert [len(y) for _, y in e_serial] == [4, 4, 2]
        for (xs, ys), (xp, yp) in zip(e_serial, e_parallel, strict=True):
            assert torch.equal(xs, xp) and torch.equal(ys, yp)
    order = [torch.cat([y for _, y in e]).tolist() for e in serial]
    assert order[0] != order[1] or not torch.equal(serial[0][0][0], serial[1][0][0])
    first = torch.cat([x for x, _ in serial[0]])
    assert not torch.equal(first, torch.stack([ds[i][0] for i in range(10)]))  # shuffled
    assert sorted(first.sum(dim=(1, 2, 3, 4)).tolist()) == sorted(
        ds[i][0].sum().item() for i in range(10)
    )  # a permutation of every item


def test_split_is_stratified_reproducible_and_round_trips(tmp_path):
    labels = pd.Series({pid(i): label_of(i) for i in range(N)})
    s = split_patients(labels, 0.2, 0.2, seed=0)
    sets = [set(s[k]) for k in ("train", "validation", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(labels.index)
    assert [len(x) for x in sets] == [15, 4, 5]  # ceil(0.2 * 24) = 5, ceil(0.2 * 19) = 4
    assert s["stratified"] is True
    assert sorted(labels[s["test"]].value_counts().tolist()) == [2, 3]
    assert labels[s["validation"]].value_counts().tolist() == [2, 2]
    assert split_patients(labels, 0.2, 0.2, seed=0) == s
    assert split_patients(labels, 0.2, 0.2, seed=1)["test"] != s["test"]
    assert load_split(save_split(s, tmp_path / "split.json")) == s
    lonely = pd.Series({pid(i): int(i == 0) for i in range(10)})  # one patient of class 1
    assert split_patients(lonely, 0.2, 0.2, seed=0)["stratified"] is False
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["a"], "validation": ["a"],
                                                   "test": []}), encoding="utf-8")  # fmt: skip
    with pytest.raises(ValueError, match="patient a is in both train and validation"):
        load_split(tmp_path / "bad.json")


def test_training_learns_the_separable_signal(trained):
    out, result = trained
    assert len(result["y_true"]) == 5
    accuracy = np.mean(np.equal(result["y_true"], result["y_pred"]))
    assert accuracy >= 0.8, result
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    threshold = meta["threshold"]  # Youden on the validation predictions, checked by hand:
    val = pd.read_csv(out / "predictions.csv").query("set == 'validation'")
    j = {t: ((val.probability >= t) & (val.label == 1)).sum() / (val.label == 1).sum()
         + ((val.probability < t) & (val.label == 0)).sum() / (val.label == 0).sum()
         for t in val.probability}  # fmt: skip
    assert j[threshold] == max(j.values())
    assert result["y_pred"] == [int(p >= threshold) for p in result["y_prob"]]
    history = result["history"]
    assert len(history["train_loss"]) == len(history["validation_loss"]) == CONFIG.epochs
    assert history["train_loss"][-1] < history["train_loss"][0]
    best = int(np.argmin(history["validation_loss"])) + 1
    assert result["best_epoch"] == best
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert meta["target"] == "functional" and meta["input_shape"] == list(SHAPE)
    assert meta["split_sizes"] == {"train": 15, "validation": 4, "test": 5}
    assert meta["left_out"] == ["P100"] == result["left_out"]  # labelled, no map
    assert meta["best_epoch"] == best and meta["device"] == "cpu"
    assert meta["config"]["channels"] == [4, 8, 16] and len(meta["data_hash"]) == 64
    assert {"torch", "numpy", "sscflow"} <= set(meta["versions"])
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert sorted(pred["patient_id"]) == [pid(i) for i in range(N)]
    assert pred.groupby("set").size().to_dict() == {"test": 5, "train": 15, "validation": 4}
    assert load_split(result["split"])["test"] == sorted(result["test_patients"])
    assert (out / "model.pt").is_file()


def test_training_is_deterministic(cohort, trained, tmp_path):
    """Same seed, same predictions, also when the maps come through two loader processes."""
    path, table = cohort
    out, first = trained
    torch.manual_seed(987)  # the caller's generator state must not matter, nor change
    state = torch.random.get_rng_state()
    again = train(path, table, "functional", ClassifierConfig(**{**vars(CONFIG),
                  "loader_workers": 2}), tmp_path)  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training
    a = pd.read_csv(out / "predictions.csv")
    b = pd.read_csv(tmp_path / "predictions.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert again["history"] == first["history"]
    meta = [json.loads((d / "metadata.json").read_text(encoding="utf-8")) for d in (out, tmp_path)]
    assert meta[0]["data_hash"] == meta[1]["data_hash"]


def test_predict_reproduces_saved_probabilities(cohort, trained):
    path, _ = cohort
    out, result = trained
    got = predict(path, result["test_patients"], out, workers=0)
    assert got["patient_id"].tolist() == result["test_patients"]
    np.testing.assert_allclose(got["probability"], result["y_prob"], rtol=0, atol=1e-6)
    assert got["prediction"].tolist() == result["y_pred"]
    saved = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    np.testing.assert_allclose(got["probability"],
                               saved.loc[result["test_patients"], "probability"], atol=1e-6)


def test_predict_refuses_a_wrong_shaped_map(cohort, trained):
    path, _ = cohort
    out, _ = trained
    with pytest.raises(ValueError, match=r"patient WRONG: .* \(12, 12, 12\) .* trained on"):
        predict(path, [pid(0), "WRONG"], out)


def test_training_needs_labelled_patients_of_both_classes(cohort, tmp_path):
    path, table = cohort
    few = table[table["patient_id"].isin([pid(i) for i in range(5)])]
    with pytest.raises(ValueError, match="target 'functional': 5 labelled patient"):
        train(path, few, "functional", CONFIG, tmp_path)
    stable = table.assign(functional="stable")
    with pytest.raises(ValueError, match="target 'functional'.*both classes"):
        train(path, stable, "functional", CONFIG, tmp_path)


def _new_store(path, template_shape=SHAPE, patients=(1, 2, 3)):
    """A store of new patients (maps as in the cohort) on a template of ``template_shape``."""
    root = st.open_store(path)
    geometry = Geometry(template_shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    mask = lung_mask() if template_shape == SHAPE else np.ones(template_shape, np.uint8)
    st.write_image(root.require_group("template"), "lung_mask", mask, geometry, stage="test",
                   params={}, input_hash="t")  # fmt: skip
    for i in patients:
        m = patient_map(i, label_of(i) == 1) if template_shape == SHAPE else np.zeros(
            template_shape, np.float32)
        st.write_image(st.patient_group(root, f"NEW{i}"), "log_jacobian_template", m, geometry,
                       stage="test", params={}, input_hash=f"n{i}")  # fmt: skip
    st.patient_group(root, "NOMAP")  # ingested, not yet in template space: not predicted
    return path


def _cli(*args):
    import os

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "sscflow.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_predict_command_writes_the_probabilities_of_new_patients(trained, tmp_path):
    """`sscflow predict` end to end: every patient of a new store that has a map, with the
    probabilities the trained model gives those same maps (the cohort's P001-P003, which the
    model saw under those names)."""
    out, _ = trained
    store = _new_store(tmp_path / "new.zarr")
    csv = tmp_path / "p.csv"
    done = _cli("predict", store, "--model", out, "--out", csv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 patients predicted" in done.stdout
    got = pd.read_csv(csv, dtype={"patient_id": str})
    assert got["patient_id"].tolist() == ["NEW1", "NEW2", "NEW3"]
    saved = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    # another batch composition than in training: float32 rounding of a few 1e-6
    np.testing.assert_allclose(got["probability"], saved.loc[[pid(1), pid(2), pid(3)],
                               "probability"], atol=1e-5)  # fmt: skip
    threshold = json.loads((out / "metadata.json").read_text(encoding="utf-8"))["threshold"]
    assert got["prediction"].tolist() == [int(p >= threshold) for p in got["probability"]]


def test_predict_command_refuses_a_store_on_another_template(trained, tmp_path):
    out, _ = trained
    store = _new_store(tmp_path / "other.zarr", template_shape=(20, 16, 16))
    done = _cli("predict", store, "--model", out, "--out", tmp_path / "p.csv")
    assert done.returncode == 1
    assert "trained on maps of shape (16, 16, 16)" in done.stderr
    assert "template lung mask is (20, 16, 16)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "p.csv").exists()
    empty = tmp_path / "empty.zarr"
    st.open_store(empty)
    done = _cli("predict", empty, "--model", out)
    assert done.returncode == 1 and "no patient has a log_jacobian_template map" in done.stderr
    done = _cli("predict", store, "--model", tmp_path / "nomodel")
    assert done.returncode == 1 and "has no metadata.json" in done.stderr


def test_predict_command_says_which_patients_the_model_was_trained_on(trained, tmp_path):
    """Patients the model saw (one from each of its training, validation and test sets, as its
    own predictions.csv records them) and one new patient, scored without retraining."""
    out, _ = trained
    saved = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    picks = {s: saved.loc[saved["set"] == s, "patient_id"].iloc[0]
             for s in ("train", "validation", "test")}  # fmt: skip
    store = _new_store(tmp_path / "mixed.zarr", patients=(1,))  # NEW1: new to the model
    root = st.open_store(store)
    for p in picks.values():
        i = int(p[1:])
        st.write_image(st.patient_group(root, p), "log_jacobian_template",
                       patient_map(i, label_of(i) == 1), GEOMETRY, stage="test", params={},
                       input_hash=p)  # fmt: skip
    csv = tmp_path / "p.csv"
    done = _cli("predict", store, "--model", out, "--out", csv)
    assert done.returncode == 0, done.stdout + done.stderr
    got = pd.read_csv(csv, dtype={"patient_id": str}).set_index("patient_id")
    assert got.loc["NEW1", "model_set"] == "new"
    for s, p in picks.items():
        assert got.loc[p, "model_set"] == s, (p, s)
        assert bool(got.loc[p, "in_training_set"]) == (s == "train")
    assert ("1 were in the model's training set, 1 in its validation set, 1 in its test set "
            "and 1 are new to it") in done.stdout  # fmt: skip
    assert f"in the training set: {picks['train']}" in done.stdout
