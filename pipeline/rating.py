"""``stage=rate``: the rating page for the run's layers (SEMANTICS.md §11), serving until
interrupted; answers land in the ``ratings`` table as they are given."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.graph import Run
from pipeline.scoring import iou_artifacts, layer_contexts, top_images_artifact
from stages.network.perturb import Perturbation
from storage.artifacts import Artifact
from storage.errors import UserError
from storage.tables import partition_artifact

if TYPE_CHECKING:  # the rating server and its strips load only for stage=rate
    from stages.rate import RatedLayer

log = logging.getLogger("netdissect")


def ratings_artifact(run: Run, model: str, layer: str, keys: dict, rater: str) -> Artifact:
    """One rater's rows of one layer.  Their fingerprint is their key alone: answers are
    what people said, not a result to rebuild when what they rated is re-scored (each row
    keeps the label it was asked about)."""
    params = {**keys, "rater": rater}
    return partition_artifact(run.layout.results, "ratings", model, layer, params, {})


def rated_layers(run: Run) -> list[RatedLayer]:
    """Every layer of the run with the units to rate, their top images and their ratings."""
    import pandas as pd

    from stages.pages.strips import ImageCache
    from stages.rate import RatedLayer, units_to_rate
    from stages.thresholds.top_images import TopImages
    from storage.arrays import load_arrays

    layers = []
    for layer, ctx in layer_contexts(run).items():
        tables = iou_artifacts(run, ctx)
        units = units_to_rate(pd.read_parquet(tables["units"].path),
                              run.cfg.rate.detectors_only)
        acts, ident = ctx.acts, ctx.acts.model.identity
        top_artifact = top_images_artifact(run, acts.dataset.id, ident.model_id, layer,
                                           acts.layer_key(layer), ctx.basis.text)
        top = TopImages.from_state_dict(load_arrays(top_artifact.path))
        images = ImageCache(acts.dataset.root / "images", acts.store.image_paths(),
                            perturbation=Perturbation.from_text(ident.perturbation))
        keys = tables["units"].fingerprint["params"]
        name = f"{ident.name}/{layer}" + ("" if ctx.basis.text == "none"
                                          else f"[{ctx.basis.text}]")
        layers.append(RatedLayer(
            name, units, top, images,
            lambda rater, ident=ident, layer=layer, keys=keys: ratings_artifact(
                run, ident.name, layer, keys, rater), keys))
    if not any(len(layer.units) for layer in layers):
        raise UserError("rate: no detector units to rate in these layers; give "
                        "rate.detectors_only=false to rate every unit's label")
    return layers


def rate_value(run: Run) -> None:
    """Serve the rating page on 127.0.0.1 until interrupted (Ctrl-C)."""
    from stages.rate import RatingBook, serve

    r = run.cfg.rate
    book = RatingBook(rated_layers(run), run.cfg.report.top_n, r.thumb_size)
    total = sum(len(layer.units) for layer in book.layers.values())

    def ready(url: str) -> None:
        print(f"Rating {total} units of {len(book.layers)} layer(s) at {url} "
              "(Ctrl-C stops; answers are saved as they are given)", flush=True)

    serve(book, "127.0.0.1", r.port, r.rater or "", ready)
