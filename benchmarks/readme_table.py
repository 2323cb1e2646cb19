"""Markdown tables for the README's performance section, from a ``bench_broden`` JSON.

    python -m benchmarks.readme_table benchmarks/results/broden.json

Nothing is measured here: every number is read from the JSON (or derived from it, e.g. a
full-Broden time from the larger size's rate), so the README says what one run found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGE_NAMES = {
    "concepts": "concept store build",
    "quantile": "thresholds",
    "quantile_full_lists": "thresholds, top-k (one pass), lists as wide as full Broden's",
    "tally": "tally (restricted, set)",
    "top_images": "top images",
    "signatures": "signatures",
    "tally_signatures": "tally + signatures, one pass",
    "bootstrap": "bootstrap, B = 200, M = 20 (the extra pass of `scoring.bootstrap`)",
}
STAGE_ORDER = tuple(STAGE_NAMES)


def _int(x: float) -> str:
    return f"{x:,.0f}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def _layer(result: dict, model: str) -> str:
    units, h, w = result["config"]["layers"][model]
    return f"{model} layer4 {units}×{h}×{w}"


def _find(result: dict, **keys) -> dict | None:
    return next((m for m in result["measurements"]
                 if all(m.get(k) == v for k, v in keys.items())), None)


def _rss(m: dict) -> str:
    workers = m.get("worker_peak_rss_mib")
    return _int(m["peak_rss_mib"]) + (f" / {_int(max(workers))}" if workers else "")


def _span(values: list[float], fmt: str) -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}–{high}"


def header(result: dict) -> str:
    machine, config, labels = result["machine"], result["config"], result["data"]["labels"]
    loads = [m["load_before"][0] for m in result["measurements"]]
    active = [v["active_pair_fraction"] for layer in result["data"]["activations"].values()
              for v in layer.values()]
    small, large = config["sizes"][0], config["sizes"][-1]
    return (
        f"Broden-scale run (`python -m benchmarks.bench_broden --n {config['n']} --scale "
        f"{config['scale']}`, {machine['date'][:10]}, {machine['cores']} cores, "
        f"{machine['cpu']}, torch {machine['torch']}): synthetic Broden-format labels, "
        f"{labels['labels']:,} labels ({', '.join(f'{k} {v}' for k, v in labels['listed'].items())}), "
        f"{labels['pixel_planes_mean']:.1f} pixel planes (at most {labels['pixel_planes_max']}) "
        f"and {labels['image_labels_mean']:.1f} image-level labels per image at "
        f"{config['segmentation'][0]}×{config['segmentation'][1]}; activations with "
        f"{_span(active, '.1%')} of (image, unit) pairs above their q = "
        f"{config['quantile']} threshold. N = {small:,} and {large:,} images; each stage in a "
        f"fresh process; 1-minute load average {_span(loads, '.1f')} during the "
        f"measurements (so absolute rates are low; compare ratios)."
    )


def stage_table(result: dict) -> str:
    small, large = result["config"]["sizes"][0], result["config"]["sizes"][-1]
    full = result["config"]["full_broden"]
    schedulers = result["config"]["schedulers"]
    projections = result["projections"]["layers"]
    many = len(schedulers) > 1
    rows = [
        f"| stage | layer |{' scheduler |' if many else ''} images/s, N = {small:,} | "
        f"images/s, N = {large:,} | peak RSS MiB{' (client / worker)' if 'local' in schedulers else ''}, "
        f"{small:,} → {large:,} | full Broden ({full:,} images) |",
        "|---|---|" + ("---|" if many else "") + "---:|---:|---:|---:|",
    ]
    models = list(result["config"]["layers"])
    for scheduler in schedulers:
        for model in [None, *models]:
            for stage in STAGE_ORDER:
                for strategy in (("top-k", "radix") if stage == "quantile" else (None,)):
                    keys = {"stage": stage, "scheduler": scheduler}
                    if model is not None:
                        keys["model"] = model
                    if strategy is not None:
                        keys["strategy"] = strategy
                    a, b = _find(result, n=small, **keys), _find(result, n=large, **keys)
                    if not b or (stage == "concepts") != (model is None):
                        continue
                    name = STAGE_NAMES[stage]
                    if "q" in b and b["q"] != result["config"]["quantile"]:
                        name += f" (q = {b['q']:.4f})"
                    if strategy:
                        passes = "one pass" if strategy == "top-k" else "three passes"
                        name += f", {strategy} ({passes})"
                        if projections[model]["quantile_strategy"] == strategy:
                            name += " ← chosen at full size"
                    layer = "–" if model is None else _layer(result, model)
                    rows.append(
                        f"| {name} | {layer} |{f' {scheduler} |' if many else ''} "
                        f"{_rate(a['images_per_s']) if a else '–'} | {_rate(b['images_per_s'])} | "
                        f"{_rss(a) if a else '–'} → {_rss(b)} | {_duration(full / b['images_per_s'])} |")
    return "\n".join(rows)


def projection_table(result: dict) -> str:
    p = result["projections"]
    rows = [
        f"| layer | thresholds + tally, full Broden ({p['images']:,} images) | "
        f"activation store (raw float32) | peak RSS MiB: thresholds, tally "
        f"(N → {p['from_images']:,}: ratio; linear to full) |",
        "|---|---:|---:|---|",
    ]
    for model, layer in p["layers"].items():
        rss = "; ".join(
            f"{STAGE_NAMES[stage]} {_int(r['small_mib'])} → {_int(r['large_mib'])}: ×{r['ratio']:.2f}; "
            f"{_int(r['full_mib'])}" for stage, r in layer["peak_rss"].items())
        basis = f", {layer['quantile_basis']}" if "quantile_basis" in layer else ""
        time = (f"{_duration(layer['quantile_plus_tally_seconds'])} "
                f"({_duration(layer['quantile_seconds'])} {layer['quantile_strategy']}{basis} + "
                f"{_duration(layer['tally_seconds'])})") if "tally_seconds" in layer else "–"
        rows.append(f"| {_layer(result, model)} | {time} | "
                    f"{_size(layer['activation_store_bytes'])} "
                    f"({_size(layer['activation_raw_bytes'])}) | {rss} |")
    return "\n".join(rows)


def baseline_table(result: dict) -> str:
    small = result["config"]["sizes"][0]
    baselines = [m for m in result["measurements"] if m["stage"] == "baseline"]
    if not baselines:
        return ""
    images = baselines[0]["images"]
    cols = " | ".join(_layer(result, m["model"]) for m in baselines)
    rows = [f"| tally, images/s (× baseline) | {cols} |",
            "|---|" + "---:|" * len(baselines)]

    def row(name: str, rates: list[float | None]) -> str:
        cells = [("–" if r is None else f"{_rate(r)} (×{r / m['images_per_s']:.2f})")
                 for r, m in zip(rates, baselines, strict=True)]
        return f"| {name} | {' | '.join(cells)} |"

    rows.append(row(f"NetDissect-Lite-style loop (per image, per unit), 1 thread, first "
                    f"{images:,} images", [m["images_per_s"] for m in baselines]))
    rows.append(row("pipeline tally, lite + multiset, in-process, 1 thread, same images "
                    "(after one untimed block)",
                    [m["pipeline_one_thread_images_per_s"] for m in baselines]))
    large = result["config"]["sizes"][-1]
    pairs = [(_find(result, stage="tally", model=m["model"], n=small, scheduler="threads"),
              _find(result, stage="tally", model=m["model"], n=large, scheduler="threads"))
             for m in baselines]
    for n, index in ((small, 0), (large, 1)):
        rows.append(row(f"pipeline tally, default scoring, `threads`, N = {n:,}",
                        [p[index]["images_per_s"] if p[index] else None for p in pairs]))
    if large > small:
        rows.append(row(f"pipeline tally, `threads`, per image added from N = {small:,} to "
                        f"{large:,} (once-per-run start-up left out)",
                        [marginal_rate(*p) if all(p) else None for p in pairs]))
    equal = all(m["counts_equal"] for m in baselines)
    mask = ", ".join(f"{m['mask_pixels_per_active_pair']:.0f}" for m in baselines)
    return ("\n".join(rows) + f"\n\nBaseline counts {'equal' if equal else 'DIFFER FROM'} the "
            f"pipeline's `union=lite, planes=multiset` tally on those images (every "
            f"intersection, unit area and label area); an active pair's mask has {mask} "
            f"pixels on average.")


def marginal_rate(small: dict, large: dict) -> float | None:
    """Images per second of the images the larger run adds: what a longer run tends to, as
    a process's once-only costs (loading compiled kernels, first reads) are paid in both;
    None where timing noise made the larger run no slower."""
    extra = large["seconds"] - small["seconds"]
    return (large["images"] - small["images"]) / extra if extra > 0 else None


def store_table(result: dict) -> str:
    stores, p = result["stores"], result["projections"]
    sizes = result["config"]["sizes"]
    rows = [f"| store | {' | '.join(f'N = {n:,}' for n in sizes)} | vs raw float32 | "
            f"full Broden |", "|---|" + "---:|" * (len(sizes) + 2)]
    concepts = [stores["concepts"].get(str(n)) for n in sizes]
    if all(concepts):
        rows.append(f"| concept store (all label planes, int32, Zstd) | "
                    f"{' | '.join(_size(c) for c in concepts)} | – | "
                    f"{_size(p['concept_store_bytes'])} |")
    for model, by_size in stores["activations"].items():
        cells = [by_size[str(n)] for n in sizes]
        rows.append(f"| activations, {_layer(result, model)} | "
                    f"{' | '.join(_size(c['bytes']) for c in cells)} | "
                    f"{cells[-1]['ratio']:.0%} | "
                    f"{_size(p['layers'][model]['activation_store_bytes'])} |")
    return "\n".join(rows)


def tables(result: dict) -> str:
    parts = [header(result), stage_table(result), projection_table(result),
             baseline_table(result), store_table(result),
             f"Projections assume {result['projections']['assumption']}."]
    return "\n\n".join(p for p in parts if p) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path)
    args = parser.parse_args()
    print(tables(json.loads(args.result.read_text())), end="")


if __name__ == "__main__":
    main()
