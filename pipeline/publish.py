"""What a run shows: the report stage (its inputs: units rows and each page's top images)
and the summaries printed at the end of a run."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import DType
from pipeline.graph import Run, Target
from pipeline.scoring import top_images_artifact
from stages.network.perturb import Perturbation
from stages.report import Page, PageImages, ReportConfig
from storage import activations as astore
from storage.artifacts import Artifact, recorded, scratch_path
from storage.broden import index_fingerprint
from storage.concepts import ConceptStore
from storage.errors import UserError
from storage.tables import read_table, records_dir

if TYPE_CHECKING:  # torch, the pages and the passes load when a build runs, not to plan
    import pandas as pd

    from stages.bases.transforms import LinearMap

log = logging.getLogger("netdissect")
REPORT_FORMAT = 3  # bump when the pages change, so a current-looking report is rebuilt


def report_rows(run: Run) -> pd.DataFrame:
    frame = read_table(run.layout.results, "units")
    if frame.empty:
        raise UserError(f"{run.layout.results / 'units'}: no units table to report on; "
                        "run stage=iou first")
    wanted = run.cfg.report.concept_set
    if wanted is not None:
        known = sorted(frame["concept_set"].unique())
        frame = frame[frame["concept_set"] == wanted]
        if frame.empty:
            raise UserError(f"report.concept_set={wanted!r}: no units rows; the table has "
                            f"{', '.join(known) or 'none'}")
    return frame.reset_index(drop=True)


def _units_keys(run: Run) -> list[str]:
    """The manifest keys of every units file: the report is current while they are."""
    return [f"{path.parent.name}/{made['key']}"
            for path, made in recorded(records_dir(run.layout.results, "units"), ".parquet",
                                       recursive=True)]


def _store(run: Run, dataset: str, model_id: str) -> Path | None:
    for dtype in DType:
        path = run.layout.activations(dataset, model_id, str(dtype))
        if (path / "zarr.json").is_file():
            return path
    return None


def _page_source(run: Run, key: tuple[str, str, str, str]) -> tuple[Artifact | None, PageImages]:
    """The top-images artifact of one page's activations, or why the page has no strips."""
    dataset, model_id, layer, transform = key
    path = _store(run, dataset, model_id)
    if path is None:
        return None, PageImages(note=f"No image strips: no activation cache of {model_id} on "
                                f"{dataset} in {run.layout.workdir / 'activations'}.")
    store = astore.ActivationStore(path)
    if not store.is_complete(layer):
        return None, PageImages(note=f"No image strips: layer {layer} is not cached in {path}.")
    root = Path(store.attrs.get("dataset_root") or "")
    if not (root / "index.csv").is_file() or (
            index_fingerprint(root) != store.fingerprint.get("dataset_index")):
        return None, PageImages(note=f"No image strips: the images of dataset {dataset} are no "
                                f"longer at {root or 'a known place'}.")
    layer_key = astore.layer_artifact(path, store.fingerprint, layer).key
    artifact = top_images_artifact(run, dataset, model_id, layer, layer_key, transform)
    if not artifact.is_current() and transform != "none" and _basis_map(
            run, dataset, model_id, layer, layer_key, transform) is None:
        return None, PageImages(note=f"No image strips: the {transform} basis of {layer} is "
                                "gone from the workdir; re-run that transform's stage=iou.")
    perturbed = Perturbation.from_text(store.fingerprint["model"].get("perturbation", "none"))
    return artifact, PageImages(images_dir=root / "images",
                                image_paths=tuple(store.image_paths()), perturbation=perturbed)


def _basis_map(run: Run, dataset: str, model_id: str, layer: str, layer_key: str,
               transform: str) -> LinearMap | None:
    """The (W, b) a transformed page's units came from, found by its readable name among the
    bases made from this cached layer (a float16 and a float32 cache share the folder)."""
    from stages.bases.transforms import LinearMap

    folder = run.layout.statistic("bases", dataset, model_id, layer, "x", "").parent
    for path, made in recorded(folder, ".npz"):
        fingerprint = made["fingerprint"]
        if (made.get("complete") and fingerprint.get("transform") == transform
                and fingerprint.get("activations") == layer_key):
            return LinearMap(str(path), fingerprint.get("activation", "none"))
    return None


def report_targets(run: Run) -> list[Target]:
    frame = report_rows(run)
    keys = sorted({(str(r.dataset), str(r.model_id), str(r.layer), str(r.basis)) for r in
                   frame[["dataset", "model_id", "layer", "basis"]].drop_duplicates()
                   .itertuples(index=False)})
    sources = {key: _page_source(run, key) for key in keys}
    r = run.cfg.report

    def build_top(key: tuple[str, str, str, str], missing: list[Artifact]) -> None:
        from stages.thresholds.top_images import top_images
        from storage.arrays import save_arrays

        path = _store(run, key[0], key[1])
        basis = None if key[3] == "none" else _basis_map(
            run, *key[:3], missing[0].fingerprint["activations"], key[3])
        top = top_images(path, key[2], missing[0].fingerprint["top_n"], run.scheduler(),
                         run.cfg.progress, basis, scratch_path(missing))
        save_arrays(missing[0], top.state_dict())

    targets = [Target(f"{key[1]} {key[2]} top images", (artifact,), partial(build_top, key))
               for key, (artifact, _) in sources.items() if artifact is not None]

    def images(page: Page) -> PageImages:
        from stages.thresholds.top_images import TopImages
        from storage.arrays import load_arrays

        artifact, source = sources[page.key]
        if artifact is None:
            return source
        top = TopImages.from_state_dict(load_arrays(artifact.path))
        return PageImages(top, source.images_dir, source.image_paths,
                          perturbation=source.perturbation)

    def order(page: Page) -> int:
        path = _store(run, page.key[0], page.key[1])
        layers = astore.ActivationStore(path).layers if path else []
        return layers.index(page.layer) if page.layer in layers else len(layers)

    fingerprint = {"format": REPORT_FORMAT, "units": _units_keys(run), "top_n": r.top_n,
                   "concept_set": r.concept_set, "thumb_size": r.thumb_size,
                   "tops": sorted(a.key for a, _ in sources.values() if a is not None)}
    cfg = ReportConfig(run.layout.report, r.top_n, run.cfg.progress, r.thumb_size,
                       title_note=f"workdir {run.layout.workdir}",
                       datasets=tuple(dataset_summaries(run, sorted(set(frame["dataset"])))))

    def build(missing: list[Artifact]) -> None:
        from stages.report import build_report

        build_report(cfg, frame, images, order, read_table(run.layout.results, "layers"))
        missing[0].commit(pages=len(keys))

    targets.append(Target(f"report {run.layout.report}",
                          (Artifact(run.layout.report, fingerprint),), build))
    return targets


def dataset_summaries(run: Run, datasets: list[str]) -> list[dict]:
    """Images, sizes and labels per category of each dataset whose concept store is here."""
    found = []
    for name in datasets:
        path = run.layout.concept_store(name)
        if not (path / "zarr.json").is_file():
            continue
        store = ConceptStore.open(path)
        per_category = {c: sum(c in lab.coverage for lab in store.labels.values())
                        for c in store.categories}
        found.append({"name": name, "images": store.n_images,
                      "image_size": f"{store.ih}×{store.iw}", "label_size": f"{store.sh}×{store.sw}",
                      "labels": len(store.labels), "per_category": per_category})
    return found


def report_is_stale(run: Run) -> bool:
    """Is there a report that the result tables have moved past?"""
    if not (run.layout.report / "index.html").is_file():
        return False
    return not all(a.is_current() for t in report_targets(run) for a in t.artifacts)


def report_value(run: Run) -> Path:
    return run.layout.report / "index.html"


def print_summary(run: Run, summaries: dict[str, pd.DataFrame]) -> None:
    """Per layer: units, detectors, unique concepts per category; and where the tables are."""
    acts = run.value("extract")
    concept_set = next(iter(summaries.values()))["concept_set"].iloc[0] if summaries else ""
    ident = acts.model.identity
    first = next(iter(summaries.values())) if summaries else None
    extras = [f"{k} {first[k].iloc[0]}" for k in ("perturbation", "basis")
              if first is not None and k in first and str(first[k].iloc[0]) != "none"]
    lines = [f"Network dissection of {ident.name} ({ident.model_id}, weights {ident.weights}) "
             f"on {acts.dataset.id} (concepts: {concept_set}"
             + "".join(f"; {e}" for e in extras) + ")"]
    for layer, frame in summaries.items():
        overall = frame[frame["category"] == "all"].iloc[0]
        per_cat = ", ".join(f"{r.category} {r.unique_concepts}" for r in frame.itertuples()
                            if r.category != "all")
        lines.append(f"  {layer}: {overall.units} units, {overall.detectors} detectors, "
                     f"{overall.unique_concepts} unique concepts ({per_cat})")
    lines.append(f"Tables: {run.layout.results}/{{iou,units,layers}} (Parquet, hive-partitioned)")
    print("\n".join(lines))


def print_explanations(run: Run, frames: dict[str, pd.DataFrame]) -> None:
    for layer, frame in frames.items():
        top = frame.sort_values("iou", ascending=False).head(3)
        print(f"{layer}: best explanations " + "; ".join(
            f"unit {r.unit}: {r.formula} ({r.iou:.3f})" for r in top.itertuples()))
    print(f"Table: {run.layout.results}/explanations")

