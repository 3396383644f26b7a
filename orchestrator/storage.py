"""Paths and URIs: local directories and object-store prefixes behind one small API.

Everything goes through fsspec, so ``s3://bucket/prefix``, ``gs://...`` and plain local
paths work alike. Credentials come from the standard environment (``AWS_*``) and are never
part of a URI we print.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return (
        posixpath.join(uri.rstrip("/"), *parts) if not is_local(uri) else os.path.join(uri, *parts)
    )


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes, or only [start, end) of them."""
    fs, path = filesystem(uri)
    if start is None and end is None:
        return bytes(fs.cat_file(path))
    return bytes(fs.cat_file(path, start=start, end=end))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_published_json(uri: str, name: str, what: str, error: type[Exception]) -> Any:
    """``name`` under ``uri``, the file its writer publishes last: missing means ``uri`` is
    not ``what``, or is still being written. Raises ``error`` naming the file."""
    meta_uri = join(uri, name)
    if not exists(meta_uri):
        raise error(
            f"{meta_uri} not found: {uri} is not {what}, or it is still being written "
            f"({name} is published last)"
        )
    try:
        return json.loads(read_text(meta_uri))
    except ValueError as err:
        raise error(f"{meta_uri}: not valid JSON ({err})") from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old object or the complete new one, never a partial write.

    Local files are written beside the target and renamed over it; an object-store PUT is
    already atomic.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    if is_local(uri):
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)
