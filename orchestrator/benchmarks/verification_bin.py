"""insightface's ``.bin`` verification sets, read without executing anything.

A ``.bin`` is a pickle of ``(images, issame)``: ``2N`` encoded images (JPEG or PNG bytes,
112x112; pairs are images ``2i`` and ``2i + 1``) and ``N`` booleans. Files written under
Python 2 hold the images as byte strings; later ones as ``bytes`` or 1-D ``uint8`` arrays,
with ``issame`` a list or a ``bool`` array.

**Nothing in the file runs.** The unpickler admits the builtin containers, bytes, bools,
numbers, and the three numpy globals an array pickles to (``_reconstruct``, ``ndarray``,
``dtype``: no object dtype), plus ``_codecs.encode`` for latin-1 only (Python 3's protocol-2
spelling of ``bytes``). Any other global (``os.system`` through ``__reduce__``) is refused
before it is looked up, with :class:`BenchmarkError` naming the file and the global.

The protocol is the one published figures use: 10 folds in file order (contiguous, the
first ``N % 10`` folds one pair larger, as scikit-learn's unshuffled ``KFold``), the
threshold for each fold chosen on the other nine, accuracy mean and standard deviation
over the folds.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator import storage
from orchestrator.data.format import DatasetError
from orchestrator.data.images import CorruptImageError, decode_image

NUM_FOLDS = 10


class BenchmarkError(DatasetError):
    """A benchmark file that is malformed, foreign or unsafe to load."""


class _Refused(pickle.UnpicklingError):
    """What the file asked for, which a verification set never needs."""


def _latin1_encode(text: str, encoding: str = "latin1", *rest: Any) -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1" or rest:
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _plain_dtype(spec: Any, *args: Any) -> np.dtype[Any]:
    dtype = np.dtype(spec, *args[:2])
    if dtype.hasobject:
        raise _Refused(f"a numpy array of dtype {dtype} (Python objects)")
    return dtype


def _reconstruct(subtype: Any, *args: Any) -> Any:
    # numpy: resolved only when a pickle asks for it (the restricted unpickler)
    from numpy._core.multiarray import _reconstruct as numpy_reconstruct

    if subtype is not np.ndarray:
        raise _Refused(f"an array of subtype {subtype!r}")
    return numpy_reconstruct(subtype, *args)


ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("_codecs", "encode"): _latin1_encode,
}


class _DataOnly(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


@dataclass(frozen=True)
class VerificationBin:
    name: str  # the file's stem: lfw, cfp_fp, agedb_30, ...
    images: tuple[bytes, ...]  # 2N encoded images; pair i is images 2i and 2i + 1
    issame: npt.NDArray[np.bool_]  # (N,)

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


def benchmark_name(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(base)[0]


def read_bin(uri: str) -> VerificationBin:
    """A ``.bin`` from a local path or URI; refused with :class:`BenchmarkError` if the
    pickle asks for anything but data, or if it is not ``(2N images, N booleans)``."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"benchmark {uri} does not exist")
    try:
        loaded = _DataOnly(storage.read_bytes(uri)).load()
    except _Refused as err:
        raise BenchmarkError(
            f"{uri}: refusing to load it as a verification set: the pickle asks for {err} "
            "(a .bin holds only images and booleans)"
        ) from None
    except Exception as err:  # a truncated or foreign file: any unpickling failure
        raise BenchmarkError(f"{uri}: not an insightface verification .bin ({err})") from None
    return checked_bin(loaded, uri)


def checked_bin(loaded: Any, uri: str) -> VerificationBin:
    if not (isinstance(loaded, tuple | list) and len(loaded) == 2):
        raise BenchmarkError(
            f"{uri}: expected a pickle of (images, issame), found {type(loaded).__name__}"
        )
    raw_images, raw_same = loaded
    images = tuple(_image_bytes(item, uri, i) for i, item in enumerate(raw_images))
    same = np.asarray(raw_same)
    if same.ndim != 1 or same.dtype.kind not in "bi" or not np.isin(same, (0, 1)).all():
        raise BenchmarkError(f"{uri}: issame must be a list of booleans, found {same.dtype}")
    if len(images) != 2 * same.size:
        raise BenchmarkError(
            f"{uri}: expected 2 images per pair ({2 * same.size} for {same.size} pairs), "
            f"found {len(images)}"
        )
    return VerificationBin(benchmark_name(uri), images, same.astype(bool))


def _image_bytes(item: Any, uri: str, index: int) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise BenchmarkError(f"{uri}: image {index} is {type(item).__name__}, expected encoded bytes")


def write_bin(uri: str, images: list[bytes], issame: npt.ArrayLike) -> None:
    """insightface's layout (protocol 4, ``bytes`` images, a list of bools), atomically."""
    same = [bool(s) for s in np.asarray(issame).ravel()]
    if len(images) != 2 * len(same):
        raise ValueError(f"{len(images)} images for {len(same)} pairs (expected 2 per pair)")
    storage.write_bytes_atomic(uri, pickle.dumps((list(images), same), protocol=4))


def file_order_folds(num_pairs: int, num_folds: int = NUM_FOLDS) -> npt.NDArray[np.int64]:
    """Fold of each pair: contiguous blocks in file order, the first ``num_pairs %
    num_folds`` one pair larger (scikit-learn's ``KFold(shuffle=False)``)."""
    if num_pairs < num_folds:
        raise BenchmarkError(
            f"{num_folds}-fold evaluation needs >= {num_folds} pairs, found {num_pairs}"
        )
    sizes = np.full(num_folds, num_pairs // num_folds)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(num_folds, dtype=np.int64), sizes)


def decode_bin(vb: VerificationBin, where: str, image_size: int) -> npt.NDArray[np.uint8]:
    """All ``2N`` images decoded to (2N, S, S, 3) uint8 RGB."""
    out = np.empty((len(vb.images), image_size, image_size, 3), dtype=np.uint8)
    for i, data in enumerate(vb.images):
        image = decode_image(data, f"{where} image {i}")
        if image.shape != out.shape[1:]:
            raise CorruptImageError(
                f"{where} image {i}: is {image.shape[0]}x{image.shape[1]}, expected "
                f"{image_size}x{image_size} (the student's input)"
            )
        out[i] = image
    return out
