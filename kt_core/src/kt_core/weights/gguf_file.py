"""Opening GGUF files: header, metadata and tensor table over a memory map.

A GGUF file is a small header (magic, version, counts), key/value metadata, a table of
tensor descriptions, then the aligned tensor data. Model files are tens to hundreds of
GiB, so the file is memory-mapped and only the header pages are touched while opening;
tensor bytes are handed out as zero-copy ``uint8`` views and read from disk by the OS
when an operator actually uses them.

The parser is written for hostile input: every read is bounds-checked against the file
size, every count is checked against the bytes that could possibly hold it before a loop
or an allocation depends on it, and every problem is reported as a `GGUFFormatError`
naming the file, what was expected and what to do. A downloaded-but-truncated or
corrupt file is the common case this guards against.

Why not `gguf.GGUFReader`: it decodes every metadata array up front (a 150k-entry
vocabulary becomes 150k numpy parts before the first tensor is known) and trusts the
header, so damage surfaces as a bare ``ValueError: cannot reshape array`` or an
``IndexError`` with no file name. The `gguf` package still supplies what it is the
reference for (`GGMLQuantizationType`, `GGML_QUANT_SIZES`), and the tests check this
parser's metadata and tensor table against `GGUFReader` on the same files.

Large models come split into ``NAME-00001-of-00003.gguf``-style parts (llama.cpp's
``gguf-split``). `open_gguf` opens exactly the parts that naming pattern names, checks
them against the ``split.*`` metadata, and presents them as one file.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kt_core.errors import KtUserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
"""GGML tensors have at most four dimensions; more means the table is corrupt."""
MAX_ARRAY_NESTING = 4
"""Arrays of arrays deeper than this are not written by any known tool."""

SPLIT_NO_KEY = "split.no"
SPLIT_COUNT_KEY = "split.count"
SPLIT_TENSORS_COUNT_KEY = "split.tensors.count"

_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_HEADER_SIZE = 4 + 4 + 8 + 8
_MIN_KV_SIZE = 8 + 4 + 1
"""Smallest possible key/value entry: empty key (u64 length), type (u32), one-byte value."""
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8
"""Smallest possible tensor description: empty name, zero dims, type, offset."""

# GGUF metadata value types: id -> (name, struct format or None for string/array).
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    8: ("string", None),
    9: ("array", None),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_STRING_TYPE = 8
_ARRAY_TYPE = 9
_NUMPY_TYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("u1"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}

# GGML tensor types this reader knows the block layout of: id -> (name, block size, bytes per block).
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES
}


class GGUFFormatError(KtUserError):
    """A GGUF file (or set of split parts) is malformed, truncated or unsupported."""


def ggml_type_sizes(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of the GGML type called `ggml_type`."""
    for name, block, size in _GGML_TYPES.values():
        if name == ggml_type:
            return block, size
    raise KeyError(ggml_type)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its type, PyTorch-order shape and where its bytes are.

    `offset` is the absolute byte offset in `path`. `data` is a read-only zero-copy view of
    the stored bytes; creating it costs nothing and the OS reads the pages on first touch.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int
    path: Path
    offset: int
    _buffer: mmap.mmap = field(repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def data(self) -> np.ndarray:
        """The stored bytes as a flat read-only ``uint8`` array backed by the memory map."""
        return np.frombuffer(self._buffer, dtype=np.uint8, count=self.nbytes, offset=self.offset)


@dataclass
class _Part:
    """One parsed physical file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, str]
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_offset: int
    size: int
    buffer: mmap.mmap


class GGUFFile:
    """An opened GGUF model: one file or all parts of a split one, memory-mapped.

    `metadata` holds plain Python values (strings decoded, arrays as lists) of the first
    part, which is where llama.cpp's ``gguf-split`` puts the model's metadata;
    `metadata_types` names each value's GGUF type (``"uint32"``, ``"array[string]"``).
    `tensors` maps every tensor name, across all parts, to its `GGUFTensor`, in file order.
    """

    def __init__(self, parts: list[_Part]) -> None:
        self._parts = parts
        first = parts[0]
        self.path: Path = first.path
        self.paths: tuple[Path, ...] = tuple(p.path for p in parts)
        self.version: int = first.version
        self.metadata: dict[str, Any] = first.metadata
        self.metadata_types: dict[str, str] = first.metadata_types
        self.tensors: dict[str, GGUFTensor] = {}
        for part in parts:
            for name, tensor in part.tensors.items():
                if name in self.tensors:
                    raise GGUFFormatError(
                        f"{part.path}: tensor {name!r} is also in {self.tensors[name].path.name}; "
                        "split parts must not repeat tensors. The parts probably come from "
                        "different conversions: download all parts of one model again."
                    )
                self.tensors[name] = tensor

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (``"deepseek2"``, ``"qwen3moe"``…), if present."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def file_size(self) -> int:
        """Total size in bytes of all parts."""
        return sum(p.size for p in self._parts)

    @property
    def description(self) -> str:
        if len(self.paths) == 1:
            return str(self.path)
        return f"{self.path} ({len(self.paths)} parts)"

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor called `name`; `KeyError` naming the file if there is none."""
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.description}") from None

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        """Release the memory maps.

        A map that still has live `GGUFTensor.data` views cannot be unmapped; it is left to
        be released by the garbage collector when the last view goes away.
        """
        for part in self._parts:
            try:
                part.buffer.close()
            except BufferError:
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.description!r}, tensors={len(self.tensors)})"


def open_gguf(path: str | Path) -> GGUFFile:
    """Open the GGUF file at `path`; for a split model, `path` is any one of its parts.

    Only files named ``STEM-0000K-of-0000N.gguf`` with the same STEM and N in the same
    folder are opened as parts; other ``.gguf`` files next to them are never merged.
    Raises `GGUFFormatError` for malformed input and `KtUserError` if a path is missing.
    """
    path = Path(path)
    if not path.exists():
        raise KtUserError(f"GGUF file {path} does not exist")
    if path.is_dir():
        raise KtUserError(f"{path} is a directory; pass the .gguf file (for a split model, its first part)")
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        part = _parse_part(path)
        count = part.metadata.get(SPLIT_COUNT_KEY)
        if isinstance(count, int) and not isinstance(count, bool) and count > 1:
            part.buffer.close()
            raise GGUFFormatError(
                f"{path}: metadata says this is part {_as_int(part.metadata.get(SPLIT_NO_KEY), 0) + 1} of a "
                f"model split into {count} files, but its name does not follow the "
                "NAME-00001-of-0000N.gguf pattern that locates the other parts; rename the "
                "parts to that pattern (as llama.cpp's gguf-split names them) and pass the first."
            )
        return GGUFFile([part])
    return _open_split(path, match)


def _open_split(path: Path, match: re.Match[str]) -> GGUFFile:
    stem, number, count = match["stem"], int(match["no"]), int(match["count"])
    if count < 1 or not 1 <= number <= count:
        raise GGUFFormatError(f"{path}: part number {number} of {count} in the file name is not possible")
    paths = [path.with_name(f"{stem}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFFormatError(
            f"{path}: this model is split into {count} parts but {len(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}: "
            f"{', '.join(missing)}. Download all parts into the same folder."
        )
    parts: list[_Part] = []
    try:
        for k, part_path in enumerate(paths):
            part = _parse_part(part_path)
            parts.append(part)
            _check_split_metadata(part, k, count)
        _check_split_tensor_count(parts)
        return GGUFFile(parts)
    except BaseException:
        for part in parts:
            part.buffer.close()
        raise


def _as_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _check_split_metadata(part: _Part, index: int, count: int) -> None:
    """A part's ``split.*`` keys, where present, must agree with its name."""
    declared_count = part.metadata.get(SPLIT_COUNT_KEY)
    if declared_count is not None and declared_count != count:
        raise GGUFFormatError(
            f"{part.path}: file name says the model has {count} parts but its {SPLIT_COUNT_KEY} "
            f"metadata says {declared_count!r}; the parts do not belong together or were renamed. "
            "Download all parts of one model again."
        )
    declared_no = part.metadata.get(SPLIT_NO_KEY)
    if declared_no is not None and declared_no != index:
        raise GGUFFormatError(
            f"{part.path}: file name says this is part {index + 1} but its {SPLIT_NO_KEY} metadata "
            f"says part {declared_no + 1 if isinstance(declared_no, int) else declared_no!r}; "
            "the parts were renamed or mixed up. Download all parts of one model again."
        )


def _check_split_tensor_count(parts: list[_Part]) -> None:
    expected = parts[0].metadata.get(SPLIT_TENSORS_COUNT_KEY)
    actual = sum(len(p.tensors) for p in parts)
    if expected is not None and expected != actual:
        raise GGUFFormatError(
            f"{parts[0].path}: {SPLIT_TENSORS_COUNT_KEY} says the model has {expected!r} tensors but "
            f"its {len(parts)} parts hold {actual}; a part is from a different model or incomplete. "
            "Download all parts of one model again."
        )


def _parse_part(path: Path) -> _Part:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < _HEADER_SIZE:
                raise GGUFFormatError(
                    f"{path}: file is {size} bytes, too short to be a GGUF file "
                    f"(the header alone is {_HEADER_SIZE} bytes); it is probably an incomplete download"
                )
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise KtUserError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    try:
        return _Parser(path, buffer, size).parse()
    except BaseException:
        buffer.close()
        raise


class _Parser:
    """A bounds-checked cursor over one file's bytes that builds a `_Part`."""

    def __init__(self, path: Path, buffer: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buffer
        self.size = size
        self.pos = 0

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt: reading {what} needs {n} bytes at offset {self.pos}, but the "
                f"file ends at {self.size}. The file is probably an incomplete download; download it again."
            )

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def raw_string(self, what: str) -> bytes:
        length = self.u64(f"the length of {what}")
        self.need(length, what)
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return data

    def name(self, what: str) -> str:
        """A key or tensor name: must be valid UTF-8."""
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - len(data)} is not valid UTF-8: {data[:40]!r}") from None

    def parse(self) -> _Part:
        self.check_magic()
        version = self.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(self.version_problem(version))
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata count")
        self.check_count(n_kv, _MIN_KV_SIZE, "metadata entries")
        self.check_count(n_tensors, _MIN_TENSOR_INFO_SIZE, "tensors")
        metadata: dict[str, Any] = {}
        types: dict[str, str] = {}
        for i in range(n_kv):
            key = self.name(f"metadata key #{i}")
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice; the file is corrupt")
            value_type = self.u32(f"the type of metadata {key!r}")
            metadata[key], types[key] = self.value(value_type, key, 0)
        alignment = self.alignment(metadata)
        infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.place_tensors(infos, data_offset, alignment)
        return _Part(self.path, version, metadata, types, tensors, alignment, data_offset, self.size, self.buf)

    def check_magic(self) -> None:
        magic = self.buf[:4]
        if magic == GGUF_MAGIC:
            self.pos = 4
            return
        head = self.buf[:64]
        if head.startswith(b"version https://git-lfs"):
            hint = "it is a Git LFS pointer, not the model: fetch it with `git lfs pull` or download the file directly"
        elif head.lstrip().startswith((b"<", b"{")):
            hint = "it looks like an HTML/JSON page (a failed download?), not a model"
        elif magic == b"GGML" or magic in (b"ggjt", b"ggla", b"ggmf", b"lmgg", b"tjgg", b"fmgg"):
            hint = "it is a pre-GGUF GGML file; convert it to GGUF with a current llama.cpp"
        else:
            hint = "the file is not a GGUF model or is corrupt"
        raise self.fail(f"not a GGUF file: it starts with {magic!r} instead of {GGUF_MAGIC!r}; {hint}")

    def version_problem(self, version: int) -> str:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            return "big-endian GGUF files are not supported; use the little-endian version of the model"
        if version == 1:
            return "GGUF version 1 files (from 2023) are not supported; convert the model again with a current llama.cpp"
        return (
            f"unsupported GGUF version {version} (kt reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); the file is corrupt or from a newer format"
        )

    def check_count(self, count: int, min_size: int, what: str) -> None:
        """Refuse counts that could not fit in the rest of the file before looping over them."""
        available = self.size - self.pos
        if count * min_size > available:
            raise self.fail(
                f"header claims {count} {what}, which cannot fit in the remaining {available} bytes; "
                "the header is corrupt. Download the file again."
            )

    def value(self, value_type: int, key: str, depth: int) -> tuple[Any, str]:
        """One metadata value of type `value_type` and its type name."""
        spec = _VALUE_TYPES.get(value_type)
        if spec is None:
            raise self.fail(f"metadata {key!r} has unknown value type {value_type}; the file is corrupt")
        type_name, fmt = spec
        if fmt is not None:
            value = self.unpack(fmt, struct.calcsize(fmt), f"metadata {key!r}")
            return value, type_name
        if value_type == _STRING_TYPE:
            return self.raw_string(f"metadata {key!r}").decode("utf-8", "surrogateescape"), type_name
        return self.array(key, depth)

    def array(self, key: str, depth: int) -> tuple[list[Any], str]:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"metadata {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep; the file is corrupt")
        element_type = self.u32(f"the element type of metadata {key!r}")
        count = self.u64(f"the length of metadata {key!r}")
        spec = _VALUE_TYPES.get(element_type)
        if spec is None:
            raise self.fail(f"metadata {key!r} is an array of unknown value type {element_type}; the file is corrupt")
        dtype = _NUMPY_TYPES.get(element_type)
        if dtype is not None:
            self.need(count * dtype.itemsize, f"metadata {key!r} ({count} elements)")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            items: list[Any] = (values != 0).tolist() if element_type == 7 else values.tolist()
            return items, f"array[{spec[0]}]"
        min_size = 8 if element_type == _STRING_TYPE else 12
        self.check_count(count, min_size, f"elements in metadata {key!r}")
        items = []
        sub_type = spec[0]
        for _ in range(count):
            item, sub_type = self.value(element_type, key, depth + 1)
            items.append(item)
        return items, f"array[{sub_type}]"

    def alignment(self, metadata: dict[str, Any]) -> int:
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
            or alignment > 1 << 30
        ):
            raise self.fail(f"general.alignment is {alignment!r}; it must be a positive power of two")
        return alignment

    def tensor_info(self, index: int) -> tuple[str, int, tuple[int, ...], int, int]:
        """(name, type id, PyTorch-order shape, byte size, relative offset) of tensor #`index`."""
        name = self.name(f"the name of tensor #{index}")
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name!r} claims {n_dims} dimensions (GGUF allows at most {MAX_DIMS}); the file is corrupt")
        ggml_dims = [self.u64(f"the shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = self.u32(f"the type of tensor {name!r}")
        offset = self.u64(f"the data offset of tensor {name!r}")
        known = _GGML_TYPES.get(type_id)
        if known is None:
            raise self.fail(
                f"tensor {name!r} has unknown GGML type id {type_id}; the file is corrupt or uses a "
                "quantization type newer than this kt (update the gguf package and kt)"
            )
        type_name, block, block_bytes = known
        shape = tuple(reversed(ggml_dims))
        row = ggml_dims[0] if ggml_dims else 1
        if row % block:
            raise self.fail(
                f"tensor {name!r} of type {type_name} has rows of {row} elements, which is not a "
                f"multiple of its block size {block}; the file is corrupt"
            )
        nbytes = row // block * block_bytes
        for d in ggml_dims[1:]:
            nbytes *= d
        if nbytes > self.size:
            raise self.fail(
                f"tensor {name!r} with shape {list(shape)} and type {type_name} would need {nbytes} "
                f"bytes, more than the whole file ({self.size}); the tensor table is corrupt"
            )
        return name, type_id, shape, nbytes, offset

    def place_tensors(
        self, infos: list[tuple[str, int, tuple[int, ...], int, int]], data_offset: int, alignment: int
    ) -> dict[str, GGUFTensor]:
        """Resolve relative offsets; every tensor must be aligned, in bounds and not overlap another."""
        tensors: dict[str, GGUFTensor] = {}
        for name, type_id, shape, nbytes, offset in infos:
            if name in tensors:
                raise self.fail(f"tensor {name!r} appears twice in the tensor table; the file is corrupt")
            type_name = _GGML_TYPES[type_id][0]
            if offset % alignment:
                raise self.fail(
                    f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}; "
                    "the file is corrupt"
                )
            start = data_offset + offset
            if start + nbytes > self.size:
                raise self.fail(
                    f"tensor {name!r} ({type_name}, {nbytes} bytes at offset {start}) extends past the end "
                    f"of the file ({self.size} bytes); the file is truncated. Download it again."
                )
            tensors[name] = GGUFTensor(name, type_name, shape, nbytes, self.path, start, self.buf)
        by_offset = sorted(tensors.values(), key=lambda t: t.offset)
        for before, after in pairwise(by_offset):
            if before.offset + before.nbytes > after.offset:
                raise self.fail(
                    f"tensors {before.name!r} and {after.name!r} overlap in the file; the tensor table is corrupt"
                )
        return tensors
