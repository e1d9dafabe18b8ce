"""Encode images + captions into the versioned Parquet cache that training reads (Ray Data).

    python pipelines/preprocess.py                                   # shapes world, 6000 samples, local cache
    python pipelines/preprocess.py --data.num_samples=500 --data.resolution=64
    python pipelines/preprocess.py --source /data/pets --out outputs/cache      # imagefolder / tar / parquet
    ray job submit --working-dir . -- python pipelines/preprocess.py --config clusters/configs/0.5b.toml \\
        --source s3://bucket/laion-shards --out s3://bucket/cache

Sources: "shapes" (default), a folder of images with metadata.jsonl or sidecar .txt captions,
WebDataset .tar shards, or Parquet files with image-bytes and caption columns (data.image_column,
data.caption_column); local or s3:// (data.s3_endpoint or $AWS_ENDPOINT_URL_S3 for S3-compatible
stores). The cache lands in <out>/<hash of the inputs>/; a rerun with the same inputs is a no-op.
Every ``--section.field=value`` overrides the config; unknown keys fail before any work starts.
"""

from __future__ import annotations

import argparse
import sys
import time

from selfe.cli import OneLineParser, fail, int_in, loaded, unwritable
from selfe.config import Config, load_config
from selfe.configtools import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config file")
    ap.add_argument("--source", help='"shapes", a folder, or an s3:// prefix (sets data.source)')
    ap.add_argument("--out", help="cache root, local or s3:// (sets data.cache_root)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    ap.add_argument("--num-cpus", type=int_in(1), default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, overrides = ap.parse_known_args(argv)
    if args.source:
        overrides.append(f"--data.source={args.source}")
    if args.out:
        overrides.append(f"--data.cache_root={args.out}")
    cfg = loaded(lambda: load_config(args.config, overrides), Config.dump if args.print_config else None)
    if isinstance(cfg, int):
        return cfg
    if problem := unwritable(cfg.data.cache_root, "data.cache_root (--out)", cfg.data.s3_endpoint):
        return fail(problem)

    from selfe.data.cache import build_cache

    start = time.perf_counter()
    try:
        path, manifest = build_cache(cfg, force=args.force, num_cpus=args.num_cpus)
    except (ConfigError, FileNotFoundError, PermissionError, ConnectionError) as e:
        return fail(str(e))
    print(f"cache: {path} ({manifest['rows']} rows; {time.perf_counter() - start:.1f} s in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
