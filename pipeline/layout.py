"""Every path of a workdir, in one place (the pipeline, the report and pipeline.api)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.identity import dataset_id
from storage.tables import safe_name


@dataclass(frozen=True)
class Layout:
    workdir: Path

    @staticmethod
    def of(cfg: Config) -> Layout:
        return Layout(Path(cfg.workdir).expanduser().resolve())

    @property
    def results(self) -> Path:
        return self.workdir / "results"

    @property
    def report(self) -> Path:
        return self.workdir / "report"

    def synthetic_dataset(self, dataset: str) -> Path:
        return self.workdir / "datasets" / dataset

    def data_dir(self, cfg: Config) -> Path:
        """Where fetched releases are unpacked: fetch.data_dir, else <workdir>/datasets."""
        d = cfg.fetch.data_dir
        return Path(d).expanduser().resolve() if d else self.workdir / "datasets"

    def dataset_root(self, cfg: Config) -> Path:
        """The probe dataset's directory: dataset.path, a fetched release, or the synthetic set."""
        d = cfg.dataset
        if d.path:
            return Path(d.path).expanduser().resolve()
        if d.release:
            return self.data_dir(cfg) / d.release
        return self.synthetic_dataset(dataset_id(cfg))

    def concept_store(self, dataset: str, moved: str = "none") -> Path:
        """A dataset's labels (``moved``: the geometric perturbation they went through)."""
        suffix = "" if moved == "none" else f"~{safe_name(moved)}"
        return self.workdir / "concepts" / f"{dataset}{suffix}.zarr"

    def concept_set_store(self, name: str, moved: str = "none") -> Path:
        suffix = "" if moved == "none" else f"~{safe_name(moved)}"
        return self.workdir / "concepts" / f"set-{name}{suffix}.zarr"

    def demo_checkpoint(self, dataset: str, key: str) -> Path:
        return self.workdir / "models" / f"demo-{dataset}-{key}.pt"

    def activations(self, dataset: str, model_id: str, dtype: str) -> Path:
        suffix = "" if dtype == "float32" else f"-{dtype}"
        return self.workdir / "activations" / dataset / f"{model_id}{suffix}.zarr"

    def kernel_form(self, key: str) -> Path:
        """The compiled tally form checked on one machine for one shape."""
        return self.workdir / "kernels" / f"{key}.json"

    def statistic(self, kind: str, dataset: str, model_id: str, layer: str, key: str,
                  suffix: str) -> Path:
        """Per-layer statistics of a cache: thresholds, top images, signatures."""
        return self.workdir / kind / dataset / model_id / safe_name(layer) / f"{key}{suffix}"
