"""The job-level sections of a selfe config: optimiser, data, training and tracking. The model,
objective, sampler, EMA, encoder and evaluation sections live beside their code (``selfe.core``,
``selfe.encoders``) or in ``selfe.config.evaluation``; ``selfe.config.Config`` composes them all."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfe.configtools import ConfigError, check_name, check_range


@dataclass
class OptimConfig:
    """Adam with warm-up then linear decay [paper]."""

    lr: float = 3e-4
    """Peak learning rate."""
    lr_end: float = 1e-5
    """Learning rate reached at the last step (linear decay after warm-up). [ours]"""
    warmup_steps: int = 1000
    """Linear warm-up from 0."""
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables. [ours]"""

    def validate(self) -> None:
        if self.lr <= 0 or self.lr_end < 0:
            raise ConfigError("optim.lr must be > 0 and optim.lr_end >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclass
class DataConfig:
    """Where training data comes from and where its encoded cache lives."""

    source: str = "shapes"
    """"shapes" (the embedded world) or a path / s3:// URI of images + captions (see pipelines/preprocess.py)."""
    source_format: str = "auto"
    """"auto", "imagefolder", "webdataset", "parquet" or "img2dataset" (its parquet or webdataset output
    folders; auto detects them by their ``<shard>_stats.json`` files) for non-shapes sources."""
    num_samples: int = 6000
    """Shapes world: number of training samples rendered."""
    seed: int = 0
    """Shapes world: rendering seed."""
    resolution: int = 32
    """Image side in pixels after resize + centre crop."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Shapes world: relative frequency per GenEval task; empty = equal."""
    cache_root: str = "outputs/cache"
    """Directory (local or s3://) that holds versioned caches, one folder per input hash."""
    shuffle_buffer_rows: int = 8192
    """Rows in each training worker's shuffle buffer, reshuffled every epoch with a seed from (train.seed,
    epoch, rank); 0 reads the cache in its stored order. A buffer at least as large as a worker's shard
    is a full shuffle. Memory: rows x row size (about 18 KB for the shapes world). [ours]"""
    verify_cache: str = "sha256"
    """What a cache hit checks of every file the manifest lists: "sha256" (size and content: reads the
    whole cache once per job start: 0.18 s for the 54 MB shapes cache) or "size" (a listing only: catches
    missing and truncated files, not same-size damage; for multi-TB caches on S3). [ours]"""
    min_image_size: int = 16
    """Images whose shorter side is smaller are skipped and counted."""
    encode_batch_size: int = 64
    """Rows per encoder batch in the preprocessing actors."""
    encode_actors: int | None = None
    """Size of the preprocessing actor pool; None: one per GPU on a GPU cluster, else one per CPU the
    read tasks leave (``selfe.data.pool.plan_encoder_pool``; 2 cores: two actors)."""
    encode_cpus: float | None = None
    """CPUs reserved per encoder actor (also its torch threads on CPU, rounded up); None: 1 on a GPU
    cluster, else the CPUs the read tasks leave, split among the actors (2 cores: 0.75 each)."""
    encode_gpus: float | None = None
    """GPUs per encoder actor; None: 1 when the Ray cluster has GPUs, else 0."""
    decode_cpus: float = 0.5
    """CPUs reserved per read/decode/write task. Differing from ``encode_cpus`` also keeps Ray Data from
    fusing image decoding into the encoder actors, where it would run serially in front of the encoders
    (the shapes world's cheap render is fused into CPU actors on purpose: ``sources.shapes_dataset``)."""
    image_column: str = "image"
    """Parquet sources: column of encoded image bytes (or a Hugging Face ``{bytes, path}`` struct)."""
    caption_column: str = "text"
    """Caption field: Parquet column, ``metadata.jsonl`` key, WebDataset ``.json`` key."""
    s3_endpoint: str = ""
    """Endpoint URL of an S3-compatible store (MinIO, Ceph); empty: $AWS_ENDPOINT_URL_S3,
    $AWS_ENDPOINT_URL, else AWS."""

    def validate(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8 and >= 8, got {self.resolution}")
        if self.verify_cache not in ("sha256", "size"):
            raise ConfigError(f"data.verify_cache must be sha256 or size, got {self.verify_cache!r}")
        if self.shuffle_buffer_rows < 0:
            raise ConfigError(f"data.shuffle_buffer_rows must be >= 0, got {self.shuffle_buffer_rows}")
        if self.num_samples < 1 or self.encode_batch_size < 1:
            raise ConfigError("data.num_samples and data.encode_batch_size must be >= 1")
        if self.encode_actors is not None and self.encode_actors < 1:
            raise ConfigError("data.encode_actors must be >= 1, or none to size the pool from the cluster")
        if self.source_format not in ("auto", "imagefolder", "webdataset", "parquet", "img2dataset"):
            raise ConfigError(
                "data.source_format must be auto, imagefolder, webdataset, parquet or img2dataset, "
                f"got {self.source_format!r}"
            )
        if (self.encode_cpus is not None and self.encode_cpus <= 0) or self.decode_cpus <= 0:
            raise ConfigError("data.encode_cpus and data.decode_cpus must be > 0 (fractions are allowed)")
        if self.encode_gpus is not None and self.encode_gpus < 0:
            raise ConfigError("data.encode_gpus must be >= 0, or none for one per actor when GPUs exist")


@dataclass
class TrainConfig:
    """The training run: length, batch, parallelism, checkpoints."""

    steps: int = 2000
    """Optimiser steps in total."""
    batch_size: int = 64
    """Global batch, whatever the worker count: its rows are split over the workers as evenly as
    they go (sizes differ by at most one row when it does not divide) and the loss is normalised by
    the global batch, so a step is the same optimisation on 1 or N workers."""
    micro_batch_size: int = 0
    """Most rows one worker puts through one forward/backward; a worker's share of the batch above it
    runs as gradient accumulation over equal micro-batches (0: the whole share at once). Bounds
    memory when an elastic group shrinks and each worker's share grows."""
    num_workers: int | tuple[int, int] = 1
    """Ray Train workers (one per GPU on a GPU cluster). A range, ``2-8`` on the command line or
    ``[2, 8]`` in TOML, makes training elastic: it starts with what the cluster has (at least the
    low end), goes on with fewer workers when one is lost and grows back when capacity returns, each
    change a restart from the latest checkpoint at the new size."""
    resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train looks for room to add workers while the group is healthy."""
    data_order: str = "auto"
    """"global": every worker reads the whole row stream in one seeded order and keeps its rows of
    each global batch, so the batches do not depend on the worker count (a resize or a resume at
    another size trains on exactly the samples an uninterrupted run would); each worker then reads
    every row. "sharded": each worker reads its own split (every row read once), and the batches
    depend on the worker count. "auto": global for one worker or an elastic range, sharded for a
    fixed group of several. [ours]"""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; fractional values leave room for Ray Data on small machines."""
    fsdp: bool = True
    """Shard parameters, gradients, optimiser state and EMA with FSDP2 (fully_shard per block)."""
    hsdp_replicas: int = 1
    """HSDP: 1 = plain FSDP (every tensor sharded over all workers); R > 1 = a (R, num_workers / R)
    device mesh, parameters replicated across the R groups and sharded within each (set R to the
    number of nodes: all-gathers stay on the node's fast links, only gradients cross nodes)."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile (inductor) each transformer block of the online model and the EMA, in place
    (parameter names and checkpoints unchanged). The first steps pay the compile: ~2 minutes on
    2 CPU cores; then ~1.2x the eager images/s there. On an H200 (0.5b widths, bf16) ~50 s of
    compilation for 1.7-1.9x the eager step rate, so the GPU presets turn it on. [ours]"""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend of ``compile``: "inductor" (generated kernels), or "aot_eager"
    (the same graph capture and guards without code generation: seconds instead of minutes on a
    CPU, for tests and checks of recompilation)."""
    mixed_precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s of one device at the training dtype, for MFU. 0: look the GPU model up
    (``selfe.perf.PEAK_TFLOPS``); CPUs and unlisted GPUs then log achieved TFLOP/s without MFU."""
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    checkpoint_write: str = "async"
    """"async": a checkpoint's state is copied into host memory and training goes on while a background
    thread writes the files (``torch.distributed.checkpoint.async_save``); it is reported at the next
    report. "sync": written before training goes on. A preemption notice's and the last step's are
    always written at once. [ours]"""
    checkpoint_upload: str = "async"
    """"async": Ray Train copies a written checkpoint to ``storage_path`` in the background, so
    training stalls only for the local write; "sync": it waits for the copy. [ours]"""
    preemption_check_every: int = 10
    """Ask Ray for a preemption notice (a node of the group being drained) every this many steps and
    answer one with a checkpoint at once (0: never ask). Every rank waits for the others at each ask."""
    preemption_grace_s: float = 30.0
    """Seconds a preempted worker is assumed to have when the notice carries no deadline (Kubernetes'
    default terminationGracePeriodSeconds): the notice's checkpoint is written if the last one took
    less. Also the grace of a SIGTERM to a worker process: the worker checkpoints at the next step
    and exits, at most this long after the signal (0: a SIGTERM ends it at once, as Ray does)."""
    sample_every: int = 0
    """Log sample grids every this many steps (0: only at the end)."""
    eval_every: int = 0
    """Score GenEval-lite at eval.periodic_steps every this many steps inside training (0: never);
    reported as the metric ``geneval_fewstep`` (what Tune's scheduler ranks trials by)."""
    storage_path: str = "outputs/ray_results"
    """Ray Train storage (local dir or s3://) for checkpoints."""
    run_name: str = ""
    """Ray Train run name; reusing a name resumes that run. Empty: a fresh timestamped name."""
    max_failures: int = 2
    """Worker-group restarts Ray Train attempts before giving up."""
    threads_per_worker: int = 0
    """torch intra-op threads per worker; 0: the CPUs Ray sees on the worker's node divided by the
    workers there (2 on a 2-core machine, 8 on an 8-core one; ``ray.init(num_cpus=...)`` or
    ``ray start --num-cpus`` limit it)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom Ray resources per worker, e.g. {"trainer": 1} to pin workers to labelled nodes."""

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: equal for a fixed group."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[-1]))

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range
        return low != high

    @property
    def global_order(self) -> bool:
        """Whether the batches are read in one worker-count-independent order (``data_order``)."""
        return self.data_order == "global" or (self.data_order == "auto" and (self.elastic or self.max_workers == 1))

    def validate(self) -> None:
        check_range("train", self, 1, "steps", "batch_size")
        check_range("train", self, 0, "micro_batch_size")
        if not isinstance(self.num_workers, int) and len(self.num_workers) != 2:
            raise ConfigError(f"train.num_workers must be a count or a range [low, high] (2-8 on the command "
                              f"line), got {list(self.num_workers)}")
        low, high = self.worker_range
        if low < 1 or low > high:
            raise ConfigError(f"train.num_workers={low}-{high}: the range needs 1 <= low <= high")
        if self.batch_size < high:
            raise ConfigError(f"train.batch_size={self.batch_size} is smaller than train.num_workers' "
                              f"{high}: every worker needs at least one row of the global batch")
        if self.data_order not in ("auto", "global", "sharded"):
            raise ConfigError(f"train.data_order must be auto, global or sharded, got {self.data_order!r}")
        uneven = [n for n in range(low, high + 1) if self.batch_size % n]
        if not self.global_order and uneven:
            # Equal splits end their epochs together only when every worker takes the same rows per step.
            raise ConfigError(f"train.batch_size={self.batch_size} does not divide over {', '.join(map(str, uneven))} "
                              "workers, which sharded data order needs: pick a batch that divides, or "
                              "train.data_order=global (any batch)")
        if self.compile_backend not in ("inductor", "aot_eager"):
            raise ConfigError(f"train.compile_backend must be inductor or aot_eager, got {self.compile_backend!r}")
        if self.checkpoint_write not in ("async", "sync"):
            raise ConfigError(f"train.checkpoint_write must be async or sync, got {self.checkpoint_write!r}")
        if self.checkpoint_upload not in ("async", "sync"):
            raise ConfigError(f"train.checkpoint_upload must be async or sync, got {self.checkpoint_upload!r}")
        check_range("train", self, 0, "preemption_check_every")
        if self.preemption_grace_s < 0:
            raise ConfigError(f"train.preemption_grace_s must be >= 0 seconds, got {self.preemption_grace_s:g}")
        if self.resize_interval_s <= 0:
            raise ConfigError(f"train.resize_interval_s must be > 0 seconds, got {self.resize_interval_s:g}")
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0 (0: look the GPU up), got {self.peak_tflops}")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.mixed_precision must be auto, bf16 or fp32, got {self.mixed_precision!r}")
        if high > 1 and not self.fsdp:
            raise ConfigError("train.num_workers > 1 needs train.fsdp=true (gradients are synchronised by FSDP)")
        check_range("train", self, 1, "hsdp_replicas")
        odd = [n for n in range(low, high + 1) if n % self.hsdp_replicas]
        if odd:
            sizes = f"{low}" if low == high else f"{low}-{high} (not {', '.join(map(str, odd))})"
            raise ConfigError(
                f"train.num_workers={sizes} must be divisible by train.hsdp_replicas={self.hsdp_replicas} "
                "(equal shard groups at every size); set hsdp_replicas to a divisor such as the node count, "
                "or 1 for an elastic range")
        if self.hsdp_replicas > 1 and not self.fsdp:
            raise ConfigError("train.hsdp_replicas > 1 needs train.fsdp=true (HSDP is FSDP over a 2-D mesh)")
        if self.cpus_per_worker <= 0:
            raise ConfigError("train.cpus_per_worker must be > 0 (use a fraction such as 0.5 on small machines)")
        # A run with checkpoint_every=0 trains without a checkpoint and loses everything on a crash.
        check_range("train", self, 1, "log_every", "checkpoint_every", "keep_checkpoints")
        check_range("train", self, 0, "sample_every", "eval_every", "threads_per_worker", "seed")
        check_range("train", self, -1, "max_failures")
        check_name("train.run_name", self.run_name, allow_empty=True)


@dataclass
class TrackingConfig:
    """MLflow tracking and registry."""

    tracking_uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory."""
    experiment: str = "selfe"
    registered_model: str = "selfe"
    alias: str = "candidate"
    promote_champion: bool = False
    """Also point the "champion" alias at the new version."""
    enabled: bool = True

    def validate(self) -> None:
        for name in ("experiment", "registered_model", "alias"):
            check_name(f"tracking.{name}", getattr(self, name))
