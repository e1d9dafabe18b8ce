"""Rows/s of the Ray Data preprocessing job vs one process running the same encode code.

    python benchmarks/preprocess_bench.py                      # 2000 shapes scenes, 2 CPUs
    python benchmarks/preprocess_bench.py --num-samples 6000 --num-cpus 2

Both sides render the same shapes scenes, encode them with the same `CaptionEmbeddings` memo and
image codec (`selfe.data.transforms.encode_arrays`) and write Parquet. The single process uses all
``--num-cpus`` torch threads; the Ray job runs as `build_cache` would (``force=True``).

Start-up is reported apart from the steady rate on both sides: the single process's model load, and
the Ray job's time until the first encoder actor holds its models (actor start + model load; Ray's
own start-up is a third figure). The ratio the issue targets is of the steady rates; the whole-run
ratio is printed too, and rows/s per encoder actor is the scaling figure (``--data.encode_actors``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selfe.config import Config, load_config


def single_process(cfg: Config, out_dir: Path, threads: int) -> tuple[float, float, float]:
    """Render, encode and write every row in this process; returns seconds (in all, of the model load, of
    the final Parquet write): the phases the Ray job's start-up, steady and finish figures match."""
    import torch
    from ray.data.extensions import ArrowTensorArray  # the tensor type Ray writes; no Ray runtime needed

    from selfe.data.shapes import ShapesConfig, generate_one, spec_to_json
    from selfe.data.transforms import CaptionEmbeddings, build_encoders, encode_arrays

    torch.set_num_threads(threads)
    start = time.perf_counter()
    codec, text = build_encoders(cfg)
    load_s = time.perf_counter() - start
    captions_memo = CaptionEmbeddings(text)
    shapes_cfg = ShapesConfig(resolution=max(cfg.data.resolution, 32))
    n, step = cfg.data.num_samples, cfg.data.encode_batch_size
    tables = []
    for first in range(0, n, step):
        samples = [generate_one(i, cfg.data.seed, shapes_cfg) for i in range(first, min(first + step, n))]
        images = np.stack([s[0] for s in samples])
        out = encode_arrays(images, [s[1] for s in samples], codec, captions_memo)
        out.pop("truncated")
        columns = {name: ArrowTensorArray.from_numpy(array) for name, array in out.items()}
        columns["caption"] = pa.array([s[1] for s in samples])
        columns["spec"] = pa.array([spec_to_json(s[2]) for s in samples])
        tables.append(pa.table(columns))
    encoded = time.perf_counter()
    pq.write_table(pa.concat_tables(tables), out_dir / "single.parquet")
    end = time.perf_counter()
    return end - start, load_s, end - encoded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--num-cpus", type=int, default=2)
    args, overrides = ap.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="selfe-bench-") as tmp:
        cfg = load_config(overrides=[f"--data.num_samples={args.num_samples}", f"--data.cache_root={tmp}", *overrides])
        n = cfg.data.num_samples

        single_s, load_s, write_s = single_process(cfg, Path(tmp), args.num_cpus)

        import ray

        from selfe.data.cache import build_cache

        start = time.perf_counter()
        from selfe.storage import ensure_ray

        ensure_ray(args.num_cpus, log_to_driver=False)  # as the job starts its local Ray
        ray_start_s = time.perf_counter() - start
        start = time.perf_counter()
        _, manifest = build_cache(cfg, force=True)
        ray_s = time.perf_counter() - start
        ray.shutdown()
    assert manifest["rows"] == n, manifest["rows"]

    tp = manifest["encode_throughput"]
    single_steady = n / (single_s - load_s - write_s)
    print(f"\n{n} shapes rows at {cfg.data.resolution}px, text encoder {cfg.text.name}, {args.num_cpus} CPUs, "
          f"{tp['pool']['actors']} encoder actor(s) of {tp['pool']['cpus']:g} CPUs")
    print(f"  single process : {single_s:6.1f} s  {n / single_s:7.1f} rows/s; start-up (model load) {load_s:.1f} s, "
          f"then {single_steady:.1f} rows/s, then {write_s:.1f} s to write ({args.num_cpus} torch threads)")
    print(f"  ray data job   : {ray_s:6.1f} s  {n / ray_s:7.1f} rows/s; start-up (to the first encoder actor ready) "
          f"{tp['startup_s']:.1f} s, then {tp['steady_rows_per_s']:.1f} rows/s, then {tp['finish_s']:.1f} s to finish "
          f"(+ {ray_start_s:.1f} s ray.init)")
    print(f"  per encoder actor: {', '.join(f'{r:.1f}' for r in tp['rows_per_s_per_actor'])} rows/s while encoding")
    print(f"  ratio ray/single: steady {tp['steady_rows_per_s'] / single_steady:.2f}x, whole run {single_s / ray_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
