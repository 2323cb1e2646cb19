"""Stages that get and vet real data: ``fetch`` (Broden releases, Places365 weights) and
``check`` (validate a Broden-format directory completely and print its census)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import weights_target
from pipeline.graph import Run, Target
from pipeline.identity import registered_weights
from stages.check import KINDS, CheckResult, check_dataset, size_text
from stages.fetch import fetch_dataset, fetched_artifact
from storage.artifacts import Artifact
from storage.errors import UserError
from storage.registry import release

log = logging.getLogger("netdissect")


def fetch_targets(run: Run) -> list[Target]:
    """The release named by dataset= and the checkpoint named by model.weights=, if any."""
    d, f = run.cfg.dataset, run.cfg.fetch
    targets = []
    if d.release:
        root = run.layout.dataset_root(run.cfg)
        artifact = fetched_artifact(root, release(d.release, "dataset"))

        def build(_missing: list[Artifact]) -> None:
            result = fetch_dataset(
                d.release, root.parent, archive=f.archive, urls=f.urls, mirrors=f.mirrors,
                keep_archive=f.keep_archive, progress=run.cfg.progress, timeout=f.timeout,
                attempts=f.attempts)
            log.info("fetch: %s", result.message)
            if result.action == "present":  # a copy placed by hand: recorded, not verified
                artifact.commit(source="placed by hand", md5=None, md5_verified=False)

        targets.append(Target(f"dataset {d.release} {root}", (artifact,), build))
    if registered_weights(run.cfg.model):
        targets.append(weights_target(run))
    if not targets:
        raise UserError("stage=fetch: nothing to fetch; name a release with dataset=broden1_224 "
                        "(or broden1_227, broden1_384) and/or a registered checkpoint with "
                        "model=resnet18_places365 (or wideresnet18, alexnet, densenet161)")
    return targets


def fetch_value(run: Run) -> list[Path]:
    return [a.path for t in fetch_targets(run) for a in t.artifacts]


def check_value(run: Run) -> CheckResult:
    """Every CSV, file, PNG size and label number of the probe dataset, and its census."""
    c = run.cfg.check
    root = run.value("dataset").root
    result = check_dataset(root, decode=c.decode, workers=c.workers, progress=run.cfg.progress)
    print(format_report(result))
    if not result.ok:
        raise UserError(f"{root}: {result.n_problems} problem(s) found, listed above")
    return result


def format_report(result: CheckResult, max_problems: int = 20) -> str:
    """A short text block: census table, then the problems (the first ``max_problems``)."""
    c = result.census
    splits = ", ".join(f"{name or '(empty)'} {n:,}" for name, n in c.splits.items())
    lines = [f"Broden dataset {result.root}: {c.images:,} images ({splits or 'no rows'})"]
    for size, n in c.image_sizes.items():
        lines.append(f"  sizes (h x w): {size_text(size)}: {n:,} images")
    lines.append(
        f"  labels: {c.labels:,} in label.csv; {len(c.multi_category_labels):,} listed in several categories"
    )
    seen_head = "  seen in planes" if result.decoded else ""
    lines.append(
        f"  {'category':<12}{'listed':>8}{'images':>9}{'planes':>9}{'max/img':>9}{'image-level':>13}{seen_head}"
    )
    for cat in c.categories:
        seen = f"{c.pixel_labels_seen.get(cat, 0):>16,}" if result.decoded else ""
        lines.append(
            f"  {cat:<12}{c.labels_per_category.get(cat, 0):>8,}{c.images_with_category.get(cat, 0):>9,}"
            f"{c.planes_per_category.get(cat, 0):>9,}{c.max_planes_per_image.get(cat, 0):>9,}"
            f"{c.image_labels_per_category.get(cat, 0):>13,}{seen}"
        )
    if result.ok:
        checked = "decoded" if result.decoded else "present (not decoded)"
        lines.append(f"  no problems: every CSV row parses, every referenced file is {checked}")
        return "\n".join(lines)
    counts = ", ".join(
        f"{kind} {result.problem_counts[kind]:,}" for kind in KINDS if kind in result.problem_counts
    )
    lines.append(f"  {result.n_problems:,} problem(s): {counts}")
    lines.extend(f"  - {p.text}" for p in result.problems[:max_problems])
    if result.n_problems > max_problems:
        lines.append(f"  ... and {result.n_problems - max_problems:,} more")
    return "\n".join(lines)
