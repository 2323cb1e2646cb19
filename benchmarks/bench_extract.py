"""Extract throughput (images/s) for resnet18 at 224 px and the store's compressed size.

    python -m benchmarks.bench_extract [--images 512] [--cluster local|threads|none]

Uses the built-in synthetic generator at 224 px (the IoU benchmark's copy when present)
and random-init weights (no download); throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks.common import directory_bytes, peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--cluster", default="local")
    parser.add_argument("--workdir", default="/tmp/bench_extract")
    parser.add_argument("--layers", default="[layer3,layer4]")
    args = parser.parse_args()
    from pipeline.run import compose_config, run
    from stages.synthetic import generate, is_complete
    from storage.activations import ActivationStore

    data = Path(args.workdir) / "synthetic224"
    params = {"n_images": args.images, "image_size": 224, "seg_size": 112}
    if not is_complete(data, **params):
        generate(data, **params)
    wd = Path(args.workdir) / "wd"
    shutil.rmtree(wd, ignore_errors=True)
    cfg = compose_config([f"workdir={wd}", f"dataset.path={data}", "stage=extract",
                          "model=resnet18", "model.weights=none", f"model.layers={args.layers}",
                          f"cluster={args.cluster}", "progress=false"])
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start
    store = ActivationStore(wd / "activations" / "synthetic224" / "resnet18.zarr")
    raw = sum(4 * int(__import__("numpy").prod(store.shape(layer))) for layer in store.layers)
    stored = directory_bytes(store.path)
    print(f"{args.images} images, cluster={args.cluster}: {seconds:.1f} s, "
          f"{args.images / seconds:.1f} images/s (including model build and cluster start)")
    print(f"store {stored / 2**20:.1f} MiB vs raw float32 {raw / 2**20:.1f} MiB "
          f"({stored / raw:.1%}); client peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
