"""Re-scoring cached activations against new concept sets; formula concepts; explanations."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import stages.demo_model
import stages.extract
import stages.network.models
from pipeline.api import rescore
from pipeline.run import compose_config, run
from stages.engine.blocks import LayerBlocks
from stages.engine.reduction import reduce_in_process
from stages.iou import formula_frame
from stages.signatures.formulas import format_formula
from stages.signatures.parsing import parse_formula
from stages.signatures.search import beam_search
from stages.tally.labels import label_space
from storage.concepts import ConceptStore
from storage.errors import UserError
from storage.tables import read_table
from tests.broden_factory import BrodenBuilder, tree_mtimes
from tests.passes import signature_pass

N_IMAGES = 14
MODEL = ["model=resnet18", "model.weights=none", "model.layers=[layer2]", "cluster=none",
         "progress=false", "dataset.block_size=4"]


def _blob(rng, value: int, size: int = 16) -> np.ndarray:
    plane = np.zeros((size, size), dtype=np.int64)
    y, x = rng.integers(0, size - 6, 2)
    h, w = rng.integers(3, 9, 2)
    plane[y : y + h, x : x + w] = value
    return plane


def build_set(root: Path, variant: str, order=None) -> Path:
    """The probe set, or the same images with modified labels ('modified')."""
    b = BrodenBuilder(root, ["object", "part", "material", "scene"], ih=32, iw=32, sh=16, sw=16)
    modified = variant == "modified"
    b.label(10, "automobile" if modified else "car", object=0.3)
    b.label(11, "tree", object=0.2)
    b.label(300, "wheel", part=0.05)
    if not modified:
        b.label(301, "leaf", part=0.04)
        b.label(41, "water", material=0.4)
    b.label(40, "ground" if modified else "grass", material=0.5)
    if modified:
        b.label(500, "blob", material=0.1)
    b.label(100, "street", scene=1.0)
    b.label(101, "park", scene=1.0)
    rows = list(range(N_IMAGES)) if order is None else order
    specs = {}
    for i in range(N_IMAGES):
        rng = np.random.default_rng(i)
        obj = np.maximum(_blob(rng, 10), _blob(rng, 11))
        pattern = (np.add.outer(np.arange(16), np.arange(16)) % 3) == 0
        part = np.where((obj == 10) & pattern, 300, np.where((obj == 11) & ~pattern, 301, 0))
        material = np.where(np.arange(16)[:, None] < 8, 40, 41) * (obj == 0)
        if modified:
            part = np.where(part == 301, 0, part)  # removed label
            material = np.where(material == 41, 40, material)  # merged into 40
            material[2:6, 9:14] = 500  # a new label drawn
        specs[i] = dict(planes={"object": [obj], "part": [part], "material": [material]},
                        scalars={"scene": [100 + i % 2]})
    for i in rows:
        b.image(name=f"img/{i:04d}.png", **specs[i])
    # images are written with seed = row; keep pixels identical whatever the row order
    root = b.write()
    from tests.broden_factory import save_rgb

    for i in rows:
        save_rgb(root / "images" / f"img/{i:04d}.png", 32, 32, seed=1000 + i)
    return root


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("probe")
    data = build_set(base / "probe", "probe")
    workdir = base / "wd"
    run(compose_config([f"workdir={workdir}", f"dataset.path={data}", "stage=iou", *MODEL]))
    return {"data": data, "workdir": workdir}


def _iou(workdir: Path, concept_set: str) -> pd.DataFrame:
    frame = read_table(workdir / "results", "iou", concept_set=concept_set)
    keep = ["layer", "unit", "label", "concept", "category", "intersection", "label_area",
            "unit_area", "union_area", "iou"]
    return frame[keep].sort_values(["layer", "unit", "label"]).reset_index(drop=True)


def test_rescore_equals_fresh_run_without_the_model(probe, tmp_path, monkeypatch):
    modified = build_set(tmp_path / "modified", "modified")
    fresh = tmp_path / "fresh"
    run(compose_config([f"workdir={fresh}", f"dataset.path={modified}", "stage=iou", *MODEL]))
    expected = _iou(fresh, "modified")

    (act,) = (probe["workdir"] / "activations" / "probe").glob("resnet18-*.zarr")
    before = {p: (t, (act / p).stat().st_size) for p, t in tree_mtimes(act).items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("the model loader must not run during re-scoring")

    for module in (stages.network.models, stages.extract):
        for name in ("build_model", "cached_model"):
            monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(stages.demo_model, "train_demo_model", forbidden)
    monkeypatch.setattr(stages.extract, "run_extract", forbidden)  # imported when it builds
    frame = rescore(probe["workdir"], concepts=modified, dataset=probe["data"],
                    overrides=MODEL)
    after = {p: (t, (act / p).stat().st_size) for p, t in tree_mtimes(act).items()}
    assert before == after
    got = _iou(probe["workdir"], "modified")
    assert set(frame["concept_set"]) == {"modified"}
    pd.testing.assert_frame_equal(got, expected)
    names = set(got["concept"])
    assert {"automobile", "ground", "blob"} <= names
    assert not {"car", "leaf", "water", "grass"} & names
    # the probe rows are still there, untouched
    assert set(read_table(probe["workdir"] / "results", "iou")["concept_set"]) == {"probe",
                                                                                 "modified"}


def test_rows_matched_by_path_in_any_order(probe, tmp_path):
    order = list(np.random.default_rng(5).permutation(N_IMAGES))
    shuffled = build_set(tmp_path / "shuffled", "probe", order=order)
    rescore(probe["workdir"], concepts=shuffled, dataset=probe["data"], overrides=MODEL)
    pd.testing.assert_frame_equal(_iou(probe["workdir"], "shuffled"), _iou(probe["workdir"], "probe"))


def test_cache_images_absent_from_set_are_left_out(probe, tmp_path):
    subset_rows = [0, 3, 4, 9]
    subset = build_set(tmp_path / "subset", "probe", order=subset_rows)
    frame = rescore(probe["workdir"], concepts=subset, dataset=probe["data"], overrides=MODEL)
    store = ConceptStore(probe["workdir"] / "concepts" / "set-subset.zarr")
    assert store.n_images == len(subset_rows)
    car = frame[(frame["concept"] == "car") & (frame["unit"] == 0)].iloc[0]
    pixels = sum(int((store.read_block(0, 4).pixel_labels[i] == 10).sum()) for i in range(4))
    assert car["label_area"] == pixels
    street = frame[(frame["concept"] == "street") & (frame["unit"] == 0)].iloc[0]
    assert street["label_area"] == 16 * 16 * sum(1 for i in subset_rows if i % 2 == 0)


def test_concept_images_missing_from_cache_is_one_error(probe, tmp_path):
    extra = build_set(tmp_path / "extra", "probe")
    index = extra / "index.csv"
    lines = index.read_text().splitlines()
    lines.append(lines[-1].replace("img/0013", "img/9999"))
    index.write_text("\n".join(lines) + "\n")
    (extra / "images" / "img" / "9999.png").write_bytes((extra / "images/img/0013.png").read_bytes())
    for suffix in ("object_1", "part_1", "material_1"):
        src = extra / "images" / "img" / f"0013_{suffix}.png"
        (extra / "images" / "img" / f"9999_{suffix}.png").write_bytes(src.read_bytes())
    with pytest.raises(UserError, match=r"1 concept-set image\(s\) are not in the activation cache"
                                        r".*img/9999.png"):
        rescore(probe["workdir"], concepts=extra, dataset=probe["data"], overrides=MODEL)


def test_rescore_without_cache_is_one_error(synthetic_root, tmp_path):
    with pytest.raises(UserError, match="no activation cache.*run stage=extract"):
        rescore(tmp_path / "empty", concepts=synthetic_root, dataset=synthetic_root,
                overrides=MODEL)


# ---------------------------------------------------------------- formulas


def _reference_formula(store: ConceptStore, acts: np.ndarray, thresholds: np.ndarray,
                       mask_fn) -> tuple[np.ndarray, int]:
    """Per-pixel formula mask by hand; intersection per unit and formula area."""
    n, k = acts.shape[:2]
    inter = np.zeros(k, dtype=np.int64)
    area = 0
    for i in range(n):
        blk = store.read_block(i, i + 1)
        planes = blk.pixel_labels[0]
        scalars = set(int(v) for v in blk.image_labels[0] if v)

        def has(number, planes=planes, scalars=scalars):
            whole = np.full(planes.shape[1:], number in scalars)
            return (planes == number).any(axis=0) | whole

        fmask = mask_fn(has)
        area += int(fmask.sum())
        up = F.interpolate(torch.from_numpy(acts[i : i + 1]).float(), size=fmask.shape,
                           mode="bilinear", align_corners=False)[0].numpy()
        for u in range(k):
            inter[u] += int(((up[u] > thresholds[u]) & fmask).sum())
    return inter, area


def test_formula_counts_equal_hand_computed_masks(probe):
    workdir = probe["workdir"]
    store = ConceptStore(workdir / "concepts" / "probe.zarr")
    (act_path,) = (workdir / "activations" / "probe").glob("resnet18-*.zarr")
    blocks = LayerBlocks(str(act_path), "layer2")
    acts = np.concatenate([blocks.load(b).numpy() for b in range(blocks.store().n_blocks())])
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1), 0.9, axis=1)
    space = label_space(store, None)
    (partial,) = reduce_in_process(
        signature_pass(blocks, str(store.path), thresholds, space), range(4))
    sc = partial.counts_table(space.n_labels)
    index = {name: [i + 1] for i, name in enumerate(space.names)}
    cases = {
        "(car OR tree) AND NOT wheel": lambda has: (has(10) | has(11)) & ~has(300),
        "grass AND park": lambda has: has(40) & has(101),
        "NOT (water OR street)": lambda has: ~(has(41) | has(100)),
    }
    formulas = {f"f{i}": parse_formula(text) for i, text in enumerate(cases)}
    frame = formula_frame(sc, formulas, index, {"layer": "layer2"})
    unit_area = np.zeros(acts.shape[1], dtype=np.int64)
    for i in range(acts.shape[0]):
        up = F.interpolate(torch.from_numpy(acts[i : i + 1]), size=(16, 16), mode="bilinear",
                           align_corners=False)[0].numpy()
        unit_area += (up > thresholds[:, None, None]).sum(axis=(1, 2))
    for i, fn in enumerate(cases.values()):
        inter, area = _reference_formula(store, acts, thresholds, fn)
        rows = frame[frame["concept"] == f"f{i}"].sort_values("unit")
        assert (rows["category"] == "formula").all()
        np.testing.assert_array_equal(rows["intersection"].to_numpy(), inter)
        assert (rows["label_area"] == area).all()
        np.testing.assert_array_equal(rows["unit_area"].to_numpy(), unit_area)
        union = unit_area + area - inter
        np.testing.assert_allclose(rows["iou"].to_numpy(), np.where(union > 0, inter / union, 0))


def test_formulas_through_the_cli_config(probe, tmp_path):
    formulas = tmp_path / "formulas.yaml"
    formulas.write_text('vehicle_parts: "car AND NOT wheel"\nplants: "tree OR grass"\n')
    frame = rescore(probe["workdir"], formulas=formulas, dataset=probe["data"], overrides=MODEL)
    rows = frame[frame["category"] == "formula"]
    assert set(rows["concept"]) == {"vehicle_parts", "plants"}
    assert (rows["union_mode"] == "global").all()
    bad = tmp_path / "bad.yaml"
    bad.write_text('x: "car AND NOT wheell"\n')
    with pytest.raises(UserError, match="bad.yaml.*'x'.*unknown label 'wheell'"):
        rescore(probe["workdir"], formulas=bad, dataset=probe["data"], overrides=MODEL)


# ---------------------------------------------------------------- explanations


def test_beam_search_recovers_planted_formula(tmp_path):
    """Activations at segmentation resolution fire exactly on 'car AND NOT wheel'."""
    from stages.concepts import ConceptsConfig, build_concept_store
    from storage import activations as astore

    data = build_set(tmp_path / "planted", "probe")
    store = build_concept_store(ConceptsConfig(data, tmp_path / "c.zarr", 4, False), None)
    acts = np.zeros((N_IMAGES, 3, 16, 16), dtype=np.float32)
    for i in range(N_IMAGES):
        planes = store.read_block(i, i + 1).pixel_labels[0]
        target = (planes == 10).any(0) & ~(planes == 300).any(0)
        acts[i, 0] = np.where(target, 2.0, 0.1)  # planted unit
        acts[i, 1] = np.where((planes == 40).any(0), 1.5, 0.0)  # grass
        acts[i, 2] = np.random.default_rng(i).random((16, 16))  # noise
    path = tmp_path / "a.zarr"
    astore.create_store(path, store.image_paths(), {"l": (3, 16, 16)}, 4, "float32", {"m": 1})
    for b in range(4):
        astore.write_block(path, b, 4 * b, {"l": acts[4 * b : 4 * b + 4]})
    astore.mark_complete(path)
    space = label_space(store, None)
    reduction = signature_pass(LayerBlocks(str(path), "l"), str(store.path),
                               np.array([1.0, 1.0, 0.99]), space)
    (partial,) = reduce_in_process(reduction, range(4))
    sc = partial.counts_table(space.n_labels)
    found = beam_search(sc, list(space.names), max_length=3, beam=5)
    formula, score = found[0]
    assert format_formula(formula) == "car AND NOT wheel"
    assert score == pytest.approx(1.0)
    assert format_formula(found[1][0]) == "grass" and found[1][1] == pytest.approx(1.0)
    assert found[2][1] < 0.5


def test_explain_stage_writes_table(probe):
    cfg = compose_config([f"workdir={probe['workdir']}", f"dataset.path={probe['data']}",
                          "stage=explain", "explain.max_length=2", "explain.beam=3", *MODEL])
    run(copy.deepcopy(cfg))
    table = read_table(probe["workdir"] / "results", "explanations")
    assert len(table) == 128  # resnet18 layer2 units
    assert set(table["max_length"]) == {2} and table["length"].between(0, 2).all()
    assert (table["iou"] >= 0).all() and table["iou"].max() > 0


def test_optimal_explanations_rescore_to_their_iou(probe, tmp_path):
    """explain.search=optimal: every unit proven optimal on the probe set, never below beam
    search, and each formula re-scored through concepts.formulas gives its IoU exactly."""
    import yaml

    base = [f"workdir={probe['workdir']}", f"dataset.path={probe['data']}", "stage=explain",
            *MODEL]
    run(compose_config([*base, "explain.search=optimal", "explain.workers=1"]))
    run(compose_config([*base, "explain.beam=5"]))
    table = read_table(probe["workdir"] / "results", "explanations", max_length=3)
    optimal = table[table["search"] == "optimal"].set_index("unit").sort_index()
    beam = table[(table["search"] == "beam") & (table["beam"] == 5)].set_index("unit")
    assert len(optimal) == 128 and optimal["optimal"].all()
    assert (optimal["bound"] == optimal["iou"]).all() and (optimal["gap"] == 0).all()
    assert (optimal["iou"] >= beam["iou"].sort_index()).all()
    assert beam["bound"].isna().all() and not beam["optimal"].any()
    formulas = tmp_path / "explanations.yaml"
    named = optimal[optimal["formula"] != ""]
    formulas.write_text(yaml.safe_dump({f"unit{u}": f for u, f in named["formula"].items()}))
    frame = rescore(probe["workdir"], formulas=formulas, dataset=probe["data"],
                    overrides=MODEL)
    rows = frame[frame["category"] == "formula"]
    for unit, iou in named["iou"].items():
        row = rows[(rows["concept"] == f"unit{unit}") & (rows["unit"] == unit)]
        assert row["iou"].item() == iou, (unit, named.loc[unit, "formula"])
