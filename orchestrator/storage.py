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
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

# Values that must never reach a log line, a report or an error message.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON")


class StorageError(RuntimeError):
    """Object storage refused or could not find something; the message names the object
    and the endpoint, never a credential."""


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def endpoint_env(endpoint_url: str, region: str) -> dict[str, str]:
    """A configured endpoint and region as the ``AWS_*`` variables every S3 client reads
    (empty values are left to the environment). Never credentials."""
    env = {}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    return env


def endpoint_name() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint of the URI's scheme"


def redact(text: str) -> str:
    """``text`` with every secret from :data:`SECRET_ENV` replaced by ``***``."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextmanager
def object_errors(uri: str, action: str) -> Iterator[None]:
    """Turn an object store's access-denied and no-such-bucket, and a directory where a
    file was expected, into a :class:`StorageError` that says which object, which endpoint
    and what to check."""
    try:
        yield
    except IsADirectoryError:
        raise StorageError(f"{action} {uri}: is a directory, expected a file") from None
    except (NotADirectoryError, FileExistsError):
        raise StorageError(
            f"{action} {uri}: a file is in the way (it or a parent is a file, expected a directory)"
        ) from None
    except PermissionError as err:
        raise StorageError(
            f"{action} {uri}: access denied by {endpoint_name()} ({redact(str(err))}). "
            "Check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the instance "
            "role / service account) and the bucket's policy"
        ) from None
    except FileNotFoundError as err:
        if is_local(uri) or "bucket" not in str(err).lower():
            raise
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        raise StorageError(
            f"{action} {uri}: bucket '{bucket}' does not exist at {endpoint_name()}; "
            "create it or fix the URI"
        ) from None
    except Exception as err:
        problem = connection_problem(err)
        if problem is None:
            raise
        raise StorageError(f"{action} {uri}: {problem}") from None


# botocore's exception classes, by name (botocore is imported only with s3fs).
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
UNREACHABLE = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ReadTimeoutError",
}  # fmt: skip


def connection_problem(err: BaseException) -> str | None:
    """What a user should fix when ``err`` is a missing credential or an endpoint that
    cannot be reached (None for anything else)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & NO_CREDENTIALS:
        return (
            f"no object-store credentials were found for {endpoint_name()}: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use an instance role / service "
            "account"
        )
    if names & UNREACHABLE or isinstance(err, ConnectionError):
        return (
            f"cannot reach {endpoint_name()} ({type(err).__name__}); check AWS_ENDPOINT_URL or "
            "storage.endpoint_url, and that the server is up"
        )
    return None


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return (
        posixpath.join(uri.rstrip("/"), *parts) if not is_local(uri) else os.path.join(uri, *parts)
    )


class UnsafeNameError(StorageError):
    """A name read from a file or a listing would leave the directory it must stay in."""


def child(root: str, name: str, *, source: str) -> str:
    """``root`` joined with ``name``, a name read from ``source`` (a marker, a ``meta.json``,
    a ``dataset.json``, an IJB list, a registry record), once ``name`` is shown to be a
    plain relative name inside ``root``: one or more ``/``-separated components, none of
    them empty, ``.`` or ``..``, no backslash, no NUL, no drive or scheme, not absolute.
    This is the one confinement rule for every such name, checked before anything is read,
    written or deleted; a violation names the file and the entry and touches nothing."""
    problem = unsafe_name_problem(name)
    if problem is not None:
        raise UnsafeNameError(
            f"{source}: entry {name!r} {problem}; expected a plain relative name inside "
            f"{root}. Nothing was read, written or deleted"
        )
    return join(root, name)


def unsafe_name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain relative name, or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\x00" in name or "\\" in name:
        return "contains a NUL or a backslash"
    if name.startswith("/") or ":" in name.split("/", 1)[0]:
        return "is absolute or names a drive or a scheme"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' component"
    return None


def exists(uri: str) -> bool:
    """Whether ``uri`` exists now (object-store listings are not taken from a cache, since
    another process may have written since)."""
    fs, path = filesystem(uri)
    with object_errors(uri, "checking"):
        if not is_local(uri):
            fs.invalidate_cache(path)
        return bool(fs.exists(path))


def isdir(uri: str) -> bool:
    """Whether ``uri`` is a directory (local) or a prefix with objects under it."""
    fs, path = filesystem(uri)
    with object_errors(uri, "checking"):
        return bool(fs.isdir(path))


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes, or only [start, end) of them."""
    fs, path = filesystem(uri)
    with object_errors(uri, "reading"):
        if start is None and end is None:
            return bytes(fs.cat_file(path))
        return bytes(fs.cat_file(path, start=start, end=end))


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    with object_errors(uri, "reading"):
        return int(fs.size(path))


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StorageError(
            f"{uri}: expected UTF-8 text, found bytes that are not (at byte {err.start})"
        ) from None


def read_published_json(uri: str, name: str, *, what: str, error: type[Exception]) -> Any:
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
        with object_errors(uri, "writing"):
            fs.pipe_file(path, data)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    """Create a local directory; on an object store, check that the bucket exists (there
    are no directories to create)."""
    fs, path = filesystem(uri)
    if is_local(uri):
        with object_errors(uri, "creating"):
            fs.makedirs(path, exist_ok=True)
        return
    bucket = path.split("/", 1)[0]
    with object_errors(uri, "writing"):
        fs.invalidate_cache(bucket)
        # info, not exists: s3fs answers exists(bucket) False on access denied too.
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket} does not exist") from None


def delete(uri: str) -> None:
    """Remove one object or file; no error if it is already gone."""
    if exists(uri):
        fs, path = filesystem(uri)
        with object_errors(uri, "deleting"):
            fs.rm_file(path)


def remove_empty_dir(uri: str) -> None:
    """Remove a local directory if it is empty (an object-store prefix with nothing under
    it does not exist); anything in it is left alone."""
    if is_local(uri):
        with suppress(OSError):  # absent, or not empty
            os.rmdir(uri)


def remove_tree(uri: str) -> None:
    """Delete a local directory or every object under a prefix; no error if absent."""
    if exists(uri):
        fs, path = filesystem(uri)
        with object_errors(uri, "deleting"):
            fs.rm(path, recursive=True)


def glob(uri: str, pattern: str) -> list[str]:
    """The paths (inside the filesystem, sorted) matching ``pattern`` under ``uri``, listed
    now rather than from a cache."""
    fs, path = filesystem(uri)
    with object_errors(uri, "listing"):
        if not is_local(uri):
            fs.invalidate_cache(path)
        return sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))


def file_names(uri: str) -> set[str]:
    """The relative names (``/``-separated) of every file under ``uri``, listed now: one
    listing, where checking each file would be one request per file on an object store."""
    fs, path = filesystem(uri)
    base = path.rstrip("/") + "/"
    with object_errors(uri, "listing"):
        if not is_local(uri):
            fs.invalidate_cache(path)
        found = fs.find(path) if fs.isdir(path) else []
    return {str(p)[len(base) :] for p in found if str(p).startswith(base)}


def use_endpoint(endpoint_url: str, region: str) -> None:
    """Put a configured endpoint and region in this process's environment, where every S3
    client of this process (and the Ray workers it starts) reads them."""
    os.environ.update(endpoint_env(endpoint_url, region))
