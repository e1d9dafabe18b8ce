"""File fingerprints for a cache build: sizes and sha256 recorded at commit, checked on a cache hit.

A size check catches a missing or truncated file from a listing alone (one request per folder).
A sha256 check also catches same-size damage (a flipped byte, a file swapped for another of equal
length) but reads every byte back: cheap for a local cache of a few hundred MB, a full download for
a multi-TB cache on S3, which is why ``data.verify_cache`` chooses.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable

import pyarrow.fs as pafs

_CHUNK = 8 << 20


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    """Hex sha256 of one file, streamed in 8 MB chunks."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(fs: pafs.FileSystem, root: str, names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} for files named relative to ``root``."""
    return {name: sha256_of(fs, posixpath.join(root, name)) for name in names}


def damaged_files(fs: pafs.FileSystem, root: str, manifest: dict, verify: str) -> list[str]:
    """Names of the manifest's files that are missing, of the wrong size, or (``verify="sha256"``)
    of the wrong content. A manifest written before hashes were recorded is checked by size."""
    sizes: dict[str, int] = {}
    for folder in {posixpath.dirname(name) for name in manifest["file_sizes"]}:
        listing = fs.get_file_info(pafs.FileSelector(posixpath.join(root, folder), allow_not_found=True))
        sizes.update({posixpath.relpath(i.path, root): i.size for i in listing})
    wrong = [name for name, size in manifest["file_sizes"].items() if sizes.get(name) != size]
    hashes = manifest.get("file_sha256")
    if wrong or verify != "sha256" or not hashes:
        return wrong
    return [name for name, digest in hashes.items() if sha256_of(fs, posixpath.join(root, name)) != digest]
