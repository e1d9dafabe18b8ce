"""Sharded checkpoints with torch.distributed.checkpoint (DCP): model, EMA, optimiser, progress, RNG.

Each rank writes its own shard files (DCP names them by rank) plus ``rng_rank{r}.safetensors``, so
the per-rank folders can be merged into one checkpoint (Ray Train does this on report). Loading
reshards, so a checkpoint written by N workers loads into M workers or into one plain model.

Nothing read back may run code: a checkpoint folder can come from shared storage that others can
write. The RNG state is safetensors + JSON, DCP's pickled ``.metadata`` goes through an unpickler
that admits only DCP's own metadata classes and torch dtypes, and DCP's non-tensor items (the
optimiser's param groups) load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import pickle
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from selfe.core.ema import reshard

PROGRESS_FILE = "progress.json"
_HASH_CHUNK = 1 << 20


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to load something other than plain data (a pickle that could run code)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states (torch, numpy, python, and ``generator``'s) as safetensors tensors
    plus string metadata: the Mersenne-Twister words are tensors, the few scalars JSON."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "python_words": torch.tensor(py_words, dtype=torch.int64),
    }
    if generator is not None:
        tensors["generator"] = generator.get_state()
    scalars = {"numpy": [int(np_pos), int(np_has_gauss), float(np_gauss)], "python": [py_version, py_gauss]}
    return tensors, {"scalars": json.dumps(scalars)}


def set_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  generator: torch.Generator | None = None) -> None:
    """Inverse of ``rng_state``."""
    scalars = json.loads(metadata["scalars"])
    torch.set_rng_state(tensors["torch"])
    pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_gauss = scalars["python"]
    random.setstate((py_version, tuple(int(w) for w in tensors["python_words"].tolist()), py_gauss))
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank}.safetensors"


def _safe_global(module: str, name: str) -> object | None:
    """What the metadata unpickler may construct: DCP's metadata dataclasses and enums, and torch's
    dtypes, layouts, memory formats and Size. None for anything else."""
    if module.startswith("torch.distributed.checkpoint."):
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        return None
    if module == "torch":
        obj = getattr(torch, name, None)
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    if (module, name) == ("torch.serialization", "_get_layout"):  # a name -> torch.layout lookup
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath"):  # StorageMeta.checkpoint_id
        import pathlib

        return getattr(pathlib, name)
    if module == "collections" and name == "OrderedDict":
        from collections import OrderedDict

        return OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        obj = _safe_global(module, name)
        if obj is None:
            raise UnsafeCheckpointError(f".metadata references {module}.{name}, which is not checkpoint metadata")
        return obj


class _SafeReader(FileSystemReader):
    """DCP's file reader with the pickled ``.metadata`` read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args, **kwargs):
        # torch 2.13's FileSystemReader.read_metadata with the unpickler swapped.
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as metadata_file:
            metadata = _MetadataUnpickler(metadata_file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items (param groups) load with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message advises weights_only=False, exactly what must not happen here: keep
            # only the line that names the refused global.
            why = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), "not loadable")
            raise UnsafeCheckpointError(f"item {read_item.dest_index.fqn} is not plain data ({why})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    """dcp.load through the safe reader and planner; a refused file becomes one clear error."""
    reader = _SafeReader(str(path))
    try:
        # Read the metadata first ourselves: dcp.load swallows a failed read and retries other files.
        reader.read_metadata()
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as e:
        # DCP gathers each rank's exception into one CheckpointException (a BaseException).
        unsafe = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if not unsafe:
            raise
        cause: Exception = unsafe[0]
    except UnsafeCheckpointError as e:
        cause = e
    else:
        return
    raise UnsafeCheckpointError(
        f"refusing to load checkpoint {path}: {cause}; selfe did not write it (or it was altered), so it "
        "was not loaded: resume from another checkpoint or delete this folder"
    ) from None


def split_optimizer_state(optim: dict) -> dict:
    """``get_optimizer_state_dict`` output -> the layout written to DCP: Adam's 0-d ``step`` tensors
    and its moments in separate per-parameter dicts.

    This layout was brought in against a CPU slowdown after ``dcp.save`` that it turned out not to
    prevent (the moments alone trigger it; ``_single_process`` is the fix, docs/benchmarks.md). It
    stays because every selfe checkpoint written so far has it, and DCP loads by key."""
    steps = {fqn: {k: v for k, v in st.items() if k == "step"} for fqn, st in optim["state"].items()}
    rest = {fqn: {k: v for k, v in st.items() if k != "step"} for fqn, st in optim["state"].items()}
    return {"steps": steps, "moments": rest, "param_groups": optim["param_groups"]}


def join_optimizer_state(saved: dict) -> dict:
    """Inverse of ``split_optimizer_state``."""
    state = {fqn: {**saved["steps"].get(fqn, {}), **moments} for fqn, moments in saved["moments"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def _single_process() -> bool:
    """True without a process group or in a group of one: DCP then runs without collectives.

    Why: in a one-worker Ray Train job, DCP's gloo collectives (plan gathering) slowed every later
    CPU training step by ~35% (43-57 -> 22-37 img/s after a step-250 checkpoint; 40-51 after it with
    ``no_dist``; docs/benchmarks.md). A one-rank group has nothing to coordinate, so skip them."""
    return not dist.is_initialized() or dist.get_world_size() == 1


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            sha.update(chunk)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _state(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    reshard(model)
    reshard(ema)
    return {
        "model": get_model_state_dict(model),
        "ema": get_model_state_dict(ema),
        "optim": split_optimizer_state(get_optimizer_state_dict(model, optimizer)),
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict,
    generator: torch.Generator | None = None,
) -> None:
    """Write this rank's part of the checkpoint into ``path`` (a local folder).

    Rank 0 writes the progress file last (tmp + rename), with the size and sha256 of every rank's
    files, so a folder with a progress file is complete and ``verify_checkpoint`` can check it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(model, ema, optimizer), checkpoint_id=str(path), no_dist=_single_process())
    _finish(path, progress, rng_state(generator))


def save_checkpoint_async(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> Future:
    """``save_checkpoint`` in two parts: now, DCP's planning and a copy of the state into host memory
    (``dcp.async_save``'s staging; the RNG states are read now too), so training can change the
    weights at once; then, on a background thread, the files, their hashes and the progress file.
    Returns a Future of the background part's seconds; the folder is complete when it is done.

    ``group``: the process group of the background part's collectives (DCP's metadata gather and the
    hash manifest), a gloo group of its own so that they never interleave with training's
    collectives on the default group (None: one process). Wait for one Future before the next
    call: two saves in flight would share ``group`` from two threads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = rng_state(generator)
    single = _single_process()
    written = dcp.async_save(_state(model, ema, optimizer), checkpoint_id=str(path), no_dist=single,
                             process_group=None if single else group)

    def finish() -> float:
        t0 = time.perf_counter()
        written.result()
        _finish(path, progress, rng, group)
        return time.perf_counter() - t0

    return _BACKGROUND.submit(finish)


_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfe-checkpoint")


def _finish(path: Path, progress: dict, rng: tuple[dict, dict], group: dist.ProcessGroup | None = None) -> None:
    """The RNG file, then the manifest: every rank hashes what it wrote, rank 0 writes the progress file."""
    tensors, metadata = rng
    rank = _rank()
    save_file(tensors, str(_rng_file(path, rank)), metadata=metadata)
    # Each rank hashes the files it wrote (on a cluster every rank has its own folder).
    files = {p.name: _digest(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != PROGRESS_FILE}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, files, group=group)
        files = {name: d for part in gathered for name, d in part.items()}
    if rank == 0:
        tmp = path / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps({**progress, "files": files}))
        tmp.replace(path / PROGRESS_FILE)


def read_progress(path: str | Path) -> dict:
    """The progress dict (step, epoch, batch_in_epoch), without the file manifest."""
    data = json.loads((Path(path) / PROGRESS_FILE).read_text())
    data.pop("files", None)
    return data


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest: [] when every file is present
    with its recorded size and sha256 (a folder written before manifests existed is not checked)."""
    path = Path(path)
    try:
        manifest = json.loads((path / PROGRESS_FILE).read_text()).get("files")
    except (OSError, ValueError) as e:
        return [f"{PROGRESS_FILE} unreadable ({type(e).__name__})"]
    problems = []
    for name, want in (manifest or {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name} is {file.stat().st_size} bytes, expected {want['size']}")
        elif _digest(file)["sha256"] != want["sha256"]:
            problems.append(f"{name} sha256 differs")
    return problems


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
) -> dict:
    """Restore model, EMA, optimiser and this rank's RNG from ``path``; returns the progress dict."""
    path = Path(path)
    state = {
        "model": get_model_state_dict(model),
        "ema": get_model_state_dict(ema),
        "optim": split_optimizer_state(get_optimizer_state_dict(model, optimizer)),
    }
    _dcp_load(state, path, no_dist=_single_process())
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, join_optimizer_state(state["optim"]))
    # The step generator is one stream shared by every rank (each draws the global batch's choices):
    # rank 0's state, whatever the world size that wrote the checkpoint. The process RNGs are per rank,
    # rank 0's for a rank the writing run did not have (resuming with more workers).
    own, first = _rng_file(path, _rank()), _rng_file(path, 0)
    if first.exists():
        shared, metadata = _read_rng(first)
        set_rng_state(*(_read_rng(own) if own != first and own.exists() else (shared, metadata)))
        if generator is not None and "generator" in shared:
            generator.set_state(shared["generator"])
    return read_progress(path)


def _read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def load_weights(path: str | Path, model: nn.Module, which: str = "ema") -> dict:
    """Load the ``which`` ("ema" or "model") weights of a checkpoint into a plain, unsharded model
    in a single process (no process group needed). Returns the progress dict."""
    path = Path(path)
    state = {which: model.state_dict()}
    _dcp_load(state, path, no_dist=True)
    model.load_state_dict(state[which])
    return read_progress(path)


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder is usable once DCP's metadata and the progress file (written last) exist."""
    path = Path(path)
    return (path / ".metadata").exists() and (path / PROGRESS_FILE).exists()
