"""Typed configuration: Hydra structured configs, each default written once, here.

The YAML files under ``conf/`` are presets (a model, a dataset, a cluster, a scoring rule
set): they only set what differs from these defaults.  OmegaConf checks types and choices
while Hydra composes; :func:`validate` checks everything else (ranges, files, combinations)
once, before any work or Dask cluster starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from storage.errors import UserError

# Choices are enums, so OmegaConf refuses anything else while composing the config.
Stage = StrEnum("Stage", ["dataset", "concepts", "model", "extract", "quantile", "iou",
                          "rescore", "explain", "loadings", "probe", "rate", "report",
                          "all", "fetch", "check"])
UnionMode = StrEnum("UnionMode", ["restricted", "global", "lite"])
Planes = StrEnum("Planes", ["set", "multiset"])
DType = StrEnum("DType", ["float32", "float16"])
Preprocess = StrEnum("Preprocess", ["imagenet", "netdissect"])
ClusterKind = StrEnum("ClusterKind", ["local", "threads", "none", "cuda"])
TransformKind = StrEnum("TransformKind", ["none", "rotate", "pca", "linear"])
NullKind = StrEnum("NullKind", ["none", "permute"])
Pool = StrEnum("Pool", ["mean", "max"])
Search = StrEnum("Search", ["beam", "optimal"])
DEMO_WEIGHTS = "train"  # model.weights value: train (or reuse) the demo model on the probe set
BRODEN_FILES = ("index.csv", "category.csv", "label.csv", "images")  # what every Broden dir has


@dataclass
class SyntheticOptions:
    n_images: int = 2000
    image_size: int = 112
    seg_size: int = 56
    seed: int = 0


@dataclass
class DatasetOptions:
    path: str | None = None  # a Broden-format directory; null = the built-in synthetic set
    release: str | None = None  # a registered Broden release (stage=fetch puts it in place)
    name: str | None = None  # dataset id in paths and tables; default: the directory's name
    block_size: int = 64  # images per chunk and per task in every store
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)


@dataclass
class TrainOptions:
    """The demo model's trainer (``model.weights=train``)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.003
    seed: int = 0
    width: int = 32


@dataclass
class ModelOptions:
    name: str | None = None  # the readable `model` column; default: arch or factory name
    arch: str | None = None  # a torchvision model name ...
    factory: str | None = None  # ... or 'package.module:function'
    weights: str | None = None  # torchvision weights name, checkpoint path, none, or train
    layers: list[str] = field(default_factory=list)
    seed: int = 0  # random init (weights=none)
    preprocess: Preprocess = Preprocess.imagenet
    input_size: int | None = None  # resize images to this many pixels square; null = native
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class ExtractOptions:
    dtype: DType = DType.float32
    batch_size: int = 32
    device: str = "auto"  # auto (cuda where the worker has one) | cpu | cuda | cuda:N
    perturb: str = "none"  # none | noise:S | rotate:DEGREES | shuffle:N (input perturbation)
    perturb_seed: int = 0  # draws of noise and shuffle, per image


@dataclass
class ScoringOptions:
    quantile: float = 0.005  # T_k = quantile 1 - q of all raw activations of unit k
    union: UnionMode = UnionMode.restricted
    planes: Planes = Planes.set
    categories: list[str] | None = None  # null = every category
    iou_threshold: float = 0.04  # detector: best IoU > this
    # the evidence of SEMANTICS.md §8 (both off by default: the tables stay as they were)
    bootstrap: int = 0  # replicates of the bootstrap over probe images; 0 = off
    ci: float = 0.95  # level of the bootstrap intervals
    candidates: int = 20  # per unit, its best labels (point IoU) searched in every replicate
    null: NullKind = NullKind.none  # permute: each image's masks against another's labels
    null_draws: int = 100  # permutations of the null
    null_level: float = 0.05  # a detector beats the null when its p-value is at most this
    seed: int = 0  # of the bootstrap weights and the null's permutations


@dataclass
class TransformOptions:
    """A basis transform of each layer before scoring (SEMANTICS.md §7)."""

    kind: TransformKind = TransformKind.none
    alpha: float = 1.0  # rotate: Q^alpha, 0 = identity, 1 = the random rotation Q
    seed: int = 0  # rotate: the draw of Q
    whiten: bool = False  # pca: divide the projections by their standard deviations
    path: str | None = None  # linear: .npy/.npz/.pt/.safetensors with W (and b)
    activation: str = "none"  # linear: none | relu | topk:N


@dataclass
class ConceptsOptions:
    path: str | None = None  # a Broden-format directory to score the cache against
    name: str | None = None  # concept_set column; default: the directory's name
    formulas: str | None = None  # YAML: names -> formulas like "(water OR sea) AND NOT boat"


@dataclass
class ExplainOptions:
    """Compositional explanations (SEMANTICS.md §12)."""

    search: Search = Search.beam  # optimal: branch and bound, with a certificate per unit
    max_length: int = 3
    beam: int = 5  # width of search=beam
    max_nodes: int | None = None  # search=optimal: nodes per unit before it stops (null: none)
    time_limit: float | None = None  # search=optimal: seconds per unit, checked after its pairs (null: none)
    workers: int | None = None  # search=optimal: processes over units (null: every core)


@dataclass
class LoadingsOptions:
    """Per-concept principal axes of each layer (SEMANTICS.md §9)."""

    concepts: list[str] | None = None  # label names; null = the `top` largest by label area
    top: int = 30
    components: int = 3  # principal axes kept per concept
    coverage: float = 0.5  # share of a feature-map cell's mask pixels the concept must carry


@dataclass
class ProbeOptions:
    """A linear classifier on pooled activations (SEMANTICS.md §10)."""

    category: str = "scene"  # classes: each image's one image-level label of this category
    targets: str | None = None  # or a CSV of image,class (image as in the dataset's index)
    pool: Pool = Pool.mean
    c: float = 0.001  # LinearSVC's C (the paper's)
    folds: int = 5
    seed: int = 0  # the folds' shuffle
    max_iter: int = 10000


@dataclass
class RateOptions:
    """The rating page of unit labels (SEMANTICS.md §11), served on 127.0.0.1."""

    rater: str | None = None  # the name the page starts with (each rater can set their own)
    port: int = 8765  # 0: any free port (printed)
    detectors_only: bool = True  # rate the detectors' labels (the paper's), or every unit's
    thumb_size: int = 128  # pixels of the longer side of each image


@dataclass
class ReportOptions:
    top_n: int = 8  # top images per unit shown with the unit's mask
    concept_set: str | None = None  # only this concept set's pages; default: all
    thumb_size: int = 96  # pixels of the longer side of each image in a strip


@dataclass
class ClusterOptions:
    kind: ClusterKind = ClusterKind.threads
    address: str | None = None  # tcp://HOST:8786: an existing scheduler (any kind)
    n_workers: int | None = None  # LocalCluster: default one worker process per core
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    no_worker_timeout: float = 60.0  # seconds a pass waits on a cluster left with no worker
    worker_wait: float = 60.0  # cluster.address: seconds to wait for its first worker


@dataclass
class FetchOptions:
    data_dir: str | None = None  # where releases are unpacked; default <workdir>/datasets
    urls: list[str] | None = None  # replace the official URL list (e.g. behind a firewall)
    mirrors: list[str] = field(default_factory=list)  # tried in order after the official URL
    archive: str | None = None  # a release's zip you already have (verified, then unpacked)
    keep_archive: bool = False
    timeout: float = 60.0  # seconds without data before a connection counts as lost
    attempts: int = 3  # tries per URL


@dataclass
class CheckOptions:
    decode: bool = True  # decode every image and label PNG (sizes, label numbers)
    workers: int | None = None  # decoding threads; default one per core, at most 8


@dataclass
class Config:
    stage: Stage = Stage.iou
    workdir: str = "./workdir"  # every store, table, report and log lives here
    progress: bool = True
    dry_run: bool = False  # print what each stage of every job would do; build nothing
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    transform: TransformOptions = field(default_factory=TransformOptions)
    concepts: ConceptsOptions = field(default_factory=ConceptsOptions)
    explain: ExplainOptions = field(default_factory=ExplainOptions)
    loadings: LoadingsOptions = field(default_factory=LoadingsOptions)
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    rate: RateOptions = field(default_factory=RateOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    check: CheckOptions = field(default_factory=CheckOptions)


ConfigStore.instance().store(name="netdissect_schema", node=Config)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{key}={value}: must be positive")


def validate(cfg: Config) -> None:
    """Every check that needs no data: ranges, files and combinations (fail before work)."""
    _positive("dataset.block_size", cfg.dataset.block_size)
    _positive("extract.batch_size", cfg.extract.batch_size)
    _positive("report.top_n", cfg.report.top_n)
    _positive("report.thumb_size", cfg.report.thumb_size)
    _positive("explain.max_length", cfg.explain.max_length)
    _positive("explain.beam", cfg.explain.beam)
    for key in ("max_nodes", "time_limit", "workers"):
        if getattr(cfg.explain, key) is not None:
            _positive(f"explain.{key}", getattr(cfg.explain, key))
    _positive("loadings.top", cfg.loadings.top)
    _positive("loadings.components", cfg.loadings.components)
    _positive("rate.thumb_size", cfg.rate.thumb_size)
    if not 0 <= cfg.rate.port <= 65535:
        raise UserError(f"rate.port={cfg.rate.port}: give a port number (0: any free port)")
    if cfg.rate.rater is not None:
        from stages.rate import RATER

        if not RATER.match(cfg.rate.rater):
            raise UserError(f"rate.rater={cfg.rate.rater}: give a name of letters, digits, "
                            "'_', '.' or '-' (at most 64)")
    _positive("probe.c", cfg.probe.c)
    _positive("probe.max_iter", cfg.probe.max_iter)
    if cfg.probe.folds < 2:
        raise UserError(f"probe.folds={cfg.probe.folds}: need at least 2 folds")
    if cfg.probe.targets:
        _check_targets(Path(cfg.probe.targets).expanduser())
    if not 0.0 < cfg.loadings.coverage <= 1.0:
        raise UserError(f"loadings.coverage={cfg.loadings.coverage}: must lie in (0, 1]")
    if not 0.0 < cfg.scoring.quantile < 1.0:
        raise UserError(f"scoring.quantile={cfg.scoring.quantile}: must lie in (0, 1)")
    if not 0.0 <= cfg.scoring.iou_threshold < 1.0:
        raise UserError(f"scoring.iou_threshold={cfg.scoring.iou_threshold}: must lie in [0, 1)")
    if cfg.scoring.bootstrap < 0:
        raise UserError(f"scoring.bootstrap={cfg.scoring.bootstrap}: give 0 (off) or a number "
                        "of replicates")
    for key in ("ci", "null_level"):
        if not 0.0 < getattr(cfg.scoring, key) < 1.0:
            raise UserError(f"scoring.{key}={getattr(cfg.scoring, key)}: must lie in (0, 1)")
    _positive("scoring.candidates", cfg.scoring.candidates)
    _positive("scoring.null_draws", cfg.scoring.null_draws)
    _positive("fetch.timeout", cfg.fetch.timeout)
    _positive("fetch.attempts", cfg.fetch.attempts)
    _positive("cluster.no_worker_timeout", cfg.cluster.no_worker_timeout)
    _positive("cluster.worker_wait", cfg.cluster.worker_wait)
    if cfg.model.input_size is not None:
        _positive("model.input_size", cfg.model.input_size)
    if cfg.dataset.path and cfg.dataset.release:
        raise UserError(f"dataset.path={cfg.dataset.path} and dataset.release="
                        f"{cfg.dataset.release}: give one of them")
    if cfg.dataset.release:
        from storage.registry import release

        release(cfg.dataset.release, "dataset")
    _validate_transform(cfg.transform)
    from stages.network.perturb import Perturbation

    Perturbation.parse(cfg.extract.perturb, cfg.extract.perturb_seed)
    if cfg.fetch.archive and not Path(cfg.fetch.archive).expanduser().is_file():
        raise UserError(f"fetch.archive={cfg.fetch.archive}: file not found")
    device = cfg.extract.device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"extract.device={device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        from stages.network.models import has_gpu  # torch: only when a GPU is asked for

        if not has_gpu():
            raise UserError(f"extract.device={device}: this machine has no CUDA device; use "
                            "extract.device=auto (a GPU where there is one, else the CPU) or cpu")
    for key, value in (("dataset.path", cfg.dataset.path), ("concepts.path", cfg.concepts.path)):
        if value and not Path(value).expanduser().is_dir():
            raise UserError(f"{key}={value}: directory not found")
        missing = [name for name in BRODEN_FILES
                   if value and not (Path(value).expanduser() / name).exists()]
        if missing:
            raise UserError(
                f"{key}={value}: not a Broden-format directory "
                f"({Path(value).expanduser() / missing[0]} not found); one holds index.csv, "
                "category.csv, label.csv, c_<category>.csv and images/ — docs/REAL_DATA.md "
                "('Your own images') shows how to make one")
    if cfg.concepts.formulas and not Path(cfg.concepts.formulas).expanduser().is_file():
        raise UserError(f"concepts.formulas={cfg.concepts.formulas}: file not found")
    m = cfg.model
    if bool(m.arch) == bool(m.factory):
        raise UserError("model: set exactly one of model.arch (a torchvision name) or "
                        f"model.factory (package.module:function); got arch={m.arch!r}, "
                        f"factory={m.factory!r}")
    if not m.layers:
        raise UserError("model.layers: give at least one layer name, e.g. model.layers=[layer4]")
    if m.weights == DEMO_WEIGHTS and m.factory != "stages.demo_model:demo_net":
        raise UserError(f"model.weights={DEMO_WEIGHTS}: only the demo model is trained by the "
                        "pipeline; give a checkpoint path, a torchvision weights name or none")


def _check_targets(path: Path) -> None:
    """probe.targets: a CSV whose header names the image and class columns."""
    import csv

    if not path.is_file():
        raise UserError(f"probe.targets={path}: file not found")
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in ("image", "class") if c not in header]
    if missing:
        raise UserError(f"probe.targets={path}: no column {missing[0]!r} in its header "
                        "(give a CSV with columns image,class)")


def _validate_transform(t: TransformOptions) -> None:
    if t.kind == TransformKind.linear:
        from stages.bases.transforms import check_activation  # torch: only for linear


        if not t.path or not Path(t.path).expanduser().is_file():
            raise UserError(f"transform.path={t.path}: transform=linear needs an existing "
                            ".npy, .npz, .pt or .safetensors file")
        check_activation(t.activation)
    elif t.kind != TransformKind.none and t.path:
        raise UserError(f"transform.path={t.path}: only transform=linear reads a file")
