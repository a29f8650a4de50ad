"""The IDX file format: a generic codec for any dtype and shape.

MNIST ships as IDX files, but nothing here is MNIST's: :func:`read_idx`
reads any IDX file (gzipped or raw), :func:`encode_idx` / :func:`write_idx`
write any array of an IDX dtype. :mod:`kdjax.paper.data` builds the MNIST loader
on top of it.

IDX format (big-endian throughout)::

  bytes 0-1   0x00 0x00
  byte  2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
              0x0D float32, 0x0E float64
  byte  3     ndim
  then        ndim uint32 sizes d_1, ..., d_ndim
  then        exactly d_1 * ... * d_ndim items, C (row-major) order

so MNIST images start with the magic number ``0x00000803`` and labels with
``0x00000801``. :func:`read_idx` checks the magic number, the header length
and that the payload holds exactly ``prod(dims)`` items; every error names the
file and what is wrong.

and :func:`read_idx` checks the magic number, the header length and that the
payload holds exactly ``prod(dims)`` items; every error names the file and
what is wrong.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zlib
from typing import Union

import numpy as np

__all__ = ["DataError", "DataNotFoundError", "IdxFormatError", "read_idx",
           "encode_idx", "write_idx", "format_dims"]

PathLike = Union[str, os.PathLike]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------
# Errors (kdjax.paper.data re-exports them).
# ----------------------------------------------------------------------------


class DataError(Exception):
  """Base class of kdjax's errors about missing or malformed data."""


class DataNotFoundError(DataError, FileNotFoundError):
  """No data directory was given, or it lacks the expected files."""


class IdxFormatError(DataError, ValueError):
  """A file is not a well-formed IDX file (or not the MNIST one expected)."""


# ----------------------------------------------------------------------------
# Reading and writing.
# ----------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path) -> bytes:
  """The file's content, gunzipped if it is gzip data (sniffed, not by name)."""
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise DataNotFoundError(
        f"IDX file {path} does not exist.") from None
  except OSError as e:
    raise DataError(f"could not read {path}: {e}") from e
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise IdxFormatError(
        f"{path} is a corrupt or truncated gzip file ({type(e).__name__}: "
        f"{e}); replace it with a good copy (gzipped or decompressed).") from e


def format_dims(dims) -> str:
  """``(60000, 28, 28) -> '60000x28x28'`` (for messages)."""
  return "x".join(str(d) for d in dims) if dims else "scalar"


def _parse_idx(data: bytes, path: PathLike) -> np.ndarray:
  """Parses IDX bytes (see the module docstring); ``path`` is for messages."""
  if len(data) < 4:
    raise IdxFormatError(
        f"{path} is truncated: {len(data)} bytes, too short for the 4-byte IDX "
        "magic number; the file may be corrupt or not IDX.")
  magic = int.from_bytes(data[:4], "big")
  code, ndim = data[2], data[3]
  if data[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
    hint = ""
    if str(path).endswith(".gz"):
      hint = " (the file is named .gz but does not hold gzip data)"
    raise IdxFormatError(
        f"bad magic number 0x{magic:08x} in {path}{hint}, expected an IDX file "
        "(0x0000TTDD: dtype code TT, DD dimensions; 0x00000801 for MNIST's "
        "labels, 0x00000803 for its images); the file may be corrupt or not "
        "IDX.")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(
        f"{path} is truncated: the header declares {ndim} dimensions "
        f"({header} header bytes), found only {len(data)} bytes.")
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
               for i in range(ndim))
  dtype = _IDX_DTYPES[code]
  expected = math.prod(dims) * dtype.itemsize
  found = len(data) - header
  if found != expected:
    what = "is truncated" if found < expected else "has trailing bytes"
    raise IdxFormatError(
        f"{path} {what}: header says {format_dims(dims)} = {expected} bytes of "
        f"data, found {found}"
        + (f" ({found - expected} extra)" if found > expected else "")
        + "; the file may be corrupt or not IDX.")
  arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header)
  # Native byte order, writable, owning its memory.
  return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: PathLike) -> np.ndarray:
  """Reads one IDX file, gzipped or raw.

  Gzip is detected from the content (``1f 8b``), so a raw file named ``.gz``
  or a gzipped one without the suffix both work.

  Args:
    path: the file.

  Returns:
    An array of shape ``(d_1, ..., d_ndim)`` and the file's dtype (native
    byte order), e.g. ``uint8 [60000, 28, 28]`` for MNIST's training images.

  Raises:
    DataNotFoundError: the file does not exist.
    IdxFormatError: corrupt gzip stream, bad magic number, short header, or a
      payload that is not exactly ``prod(dims)`` items. The message names the
      file and the problem.
  """
  path = pathlib.Path(path)
  return _parse_idx(_read_bytes(path), path)


def encode_idx(array: np.ndarray) -> bytes:
  """The IDX bytes of ``array`` (inverse of :func:`read_idx`).

  ``encode_idx(read_idx(f))`` reproduces the decompressed bytes of ``f``
  exactly, which is how the tests check the reader against MNIST's md5s.

  Args:
    array: array of dtype uint8, int8, int16, int32, float32 or float64 and
      1 to 255 dimensions.

  Returns:
    Magic number, big-endian uint32 sizes, then the big-endian data.

  Example:
    >>> import numpy as np
    >>> encode_idx(np.array([7, 2], np.uint8)).hex()
    '00000801000000020702'
  """
  array = np.asarray(array)
  codes = {dt.newbyteorder("="): c for c, dt in _IDX_DTYPES.items()}
  code = codes.get(array.dtype.newbyteorder("="))
  if code is None:
    raise TypeError(f"IDX cannot store dtype {array.dtype}; use one of "
                    f"{sorted(str(d) for d in codes)}.")
  if not 1 <= array.ndim <= 255:
    raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {array.shape}.")
  header = bytes([0, 0, code, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()


def write_idx(path: PathLike, array: np.ndarray) -> pathlib.Path:
  """Writes ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``."""
  path = pathlib.Path(path)
  data = encode_idx(array)
  if path.suffix == ".gz":
    data = gzip.compress(data, mtime=0)
  path.write_bytes(data)
  return path
