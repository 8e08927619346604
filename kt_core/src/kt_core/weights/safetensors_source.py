"""`SafetensorsSource`: a `WeightSource` over a Hugging Face safetensors checkpoint.

Accepts a ``model.safetensors`` file, a sharded checkpoint's
``model.safetensors.index.json``, or a folder holding either. Shards are opened with
`safetensors.safe_open` only when one of their tensors is first asked for (which reads
just the shard's header), so planning a 160-shard model touches nothing but the index.

MoE expert weights come in two layouts, and a source must answer the names of both:

- checkpoints (and transformers 5's own `save_pretrained`) store experts one by one:
  ``….mlp.experts.E.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I];
- the transformers 5 module holds them stacked: ``….mlp.experts.gate_up_proj``
  [E, 2I, H] (gate rows first, then up) and ``….mlp.experts.down_proj`` [E, H, I]; kt's
  expert backends ask for the split stacked ``….mlp.experts.gate_proj`` / ``up_proj``
  [E, I, H] and ``down_proj``.

Whatever the checkpoint holds, the other names are offered as virtual tensors built on
demand (stacking per-expert tensors into one preallocated tensor, or slicing a stacked
``gate_up_proj`` lazily), so operators never care which layout a checkpoint uses.

FP8 checkpoints in DeepSeek-V3's format (a float8 ``….weight`` with a float32
``….weight_scale_inv`` holding one scale per block) are dequantized by `load` (to
bfloat16 unless a dtype is asked for), so they cannot silently be used unscaled.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kt_core.errors import KtUserError
from kt_core.weights.source import MissingTensorError, RawTensor, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_FP8_BLOCK = (128, 128)

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$")

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_GGML_OF_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsFormatError(KtUserError):
    """A safetensors checkpoint is malformed, incomplete or not where it was said to be."""


@dataclass(frozen=True)
class _Stack:
    """Expert e of the virtual tensor is its `parts[e]` concatenated along rows."""

    parts: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Half:
    """Half `half` (0: gate, 1: up) of a stored stacked ``gate_up_proj`` along dim 1."""

    source: str
    half: int


@dataclass(frozen=True)
class _Concat:
    """Stored stacked tensors concatenated along dim 1 (split gate/up into gate_up)."""

    sources: tuple[str, ...]


_Recipe = _Stack | _Half | _Concat


class SafetensorsSource:
    """Tensors of a safetensors checkpoint by transformers name, plus virtual expert stacks."""

    def __init__(self, path: str | Path, *, fp8_block_size: tuple[int, int] | None = None) -> None:
        """`fp8_block_size` overrides ``quantization_config.weight_block_size`` of config.json."""
        path = Path(path)
        self.path = path
        self.fp8_block_size = fp8_block_size
        self.description = str(path)
        self._files = _locate(path)
        self._handles: dict[Path, Any] = {}
        self._virtual, self._broken = _expert_recipes(self._files)

    # -- names -----------------------------------------------------------------------

    def names(self) -> Iterator[str]:
        yield from self._files
        yield from self._virtual

    def has(self, name: str) -> bool:
        return name in self._files or name in self._virtual

    def is_virtual(self, name: str) -> bool:
        """Whether `name` is built from other stored tensors rather than stored itself."""
        return name not in self._files and name in self._virtual

    def _recipe(self, name: str) -> _Recipe:
        recipe = self._virtual.get(name)
        if recipe is not None:
            return recipe
        if name in self._broken:
            raise SafetensorsFormatError(f"cannot build {name!r} from {self.description}: {self._broken[name]}")
        raise MissingTensorError(name, self.description)

    # -- shard access ----------------------------------------------------------------

    def _handle(self, name: str) -> Any:
        shard = self._files[name]
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as e:
                raise SafetensorsFormatError(
                    f"cannot open safetensors file {shard}: {e}; it is corrupt or incomplete, download it again"
                ) from None
            self._handles[shard] = handle
        return handle

    def _stored_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, torch dtype name) of a stored tensor, from its shard's header."""
        handle = self._handle(name)
        try:
            piece = handle.get_slice(name)
        except SafetensorError:
            raise SafetensorsFormatError(
                f"the index of {self.description} puts {name!r} in {self._files[name].name}, which does not "
                "contain it; the checkpoint is inconsistent, download it again"
            ) from None
        code = piece.get_dtype()
        return tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(code, code.lower())

    def _stored(self, name: str) -> torch.Tensor:
        """A stored tensor as safetensors returns it (may share memory with its map: never write)."""
        self._stored_meta(name)
        try:
            return self._handle(name).get_tensor(name)
        except (SafetensorError, TypeError) as e:
            raise SafetensorsFormatError(f"cannot read {name!r} from {self._files[name]}: {e}") from None

    # -- WeightSource ----------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        if name in self._files:
            shape, dtype = self._stored_meta(name)
        else:
            shape, dtype = self._virtual_meta(name, self._recipe(name))
        return TensorInfo(name, shape, dtype, _nbytes(shape, dtype))

    def _virtual_meta(self, name: str, recipe: _Recipe) -> tuple[tuple[int, ...], str]:
        if isinstance(recipe, _Stack):
            metas = [[self._stored_meta(n) for n in parts] for parts in recipe.parts]
            first = metas[0]
            for e, expert in enumerate(metas):
                if expert != first:
                    raise SafetensorsFormatError(
                        f"cannot stack {name!r} from {self.description}: expert {e} has shapes/dtypes "
                        f"{expert}, expert 0 has {first}; all experts of a layer must match"
                    )
            for shape, _ in first:
                if len(shape) != 2 or shape[1:] != first[0][0][1:]:
                    raise SafetensorsFormatError(
                        f"cannot stack {name!r} from {self.description}: expert weights must be 2-D with equal "
                        f"columns, got {[s for s, _ in first]}"
                    )
            rows = sum(shape[0] for shape, _ in first)
            dtypes = {d for _, d in first}
            if len(dtypes) != 1:
                raise SafetensorsFormatError(f"cannot stack {name!r}: its parts have different dtypes {sorted(dtypes)}")
            return (len(metas), rows, *first[0][0][1:]), dtypes.pop()
        if isinstance(recipe, _Half):
            shape, dtype = self._stored_meta(recipe.source)
            if len(shape) != 3 or shape[1] % 2:
                raise SafetensorsFormatError(
                    f"cannot take {name!r} from {recipe.source!r} in {self.description}: expected a stacked "
                    f"[experts, 2 * intermediate, hidden] tensor, got shape {list(shape)}"
                )
            return (shape[0], shape[1] // 2, *shape[2:]), dtype
        metas = [self._stored_meta(n) for n in recipe.sources]
        (s0, d0), (s1, d1) = metas
        if len(s0) != 3 or s0[0::2] != s1[0::2] or d0 != d1:
            raise SafetensorsFormatError(
                f"cannot join {name!r} from {recipe.sources} in {self.description}: shapes {list(s0)} and "
                f"{list(s1)} (dtypes {d0}, {d1}) do not match as [experts, intermediate, hidden]"
            )
        return (s0[0], s0[1] + s1[1], s0[2]), d0

    def _scale_of(self, name: str) -> str | None:
        """The ``weight_scale_inv`` companion of an FP8 block-quantized weight, if any."""
        if not name.endswith(".weight"):
            return None
        scale = f"{name}_scale_inv"
        return scale if scale in self._files else None

    def _natural_dtype(self, name: str, stored_dtype: str) -> torch.dtype:
        """What `load` returns without a dtype: the stored one, bfloat16 for scaled FP8."""
        if stored_dtype.startswith("float8") and self._scale_of(name):
            return torch.bfloat16
        return getattr(torch, stored_dtype)

    def _value(self, name: str) -> torch.Tensor:
        """A stored tensor's values: FP8 weights with a scale come back dequantized (float32)."""
        stored = self._stored(name)
        scale = self._scale_of(name)
        if scale is None or stored.dtype.itemsize != 1 or not stored.dtype.is_floating_point:
            return stored
        block = self.fp8_block_size or _fp8_block_size(self._files[name].parent)
        return _dequantize_fp8_blocks(stored, self._stored(scale), block, name, self.description)

    def load(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        if name in self._files:
            target = dtype or self._natural_dtype(name, self._stored_meta(name)[1])
            return self._value(name).to(device=device, dtype=target, copy=True)
        recipe = self._recipe(name)
        shape, stored_dtype = self._virtual_meta(name, recipe)
        if dtype is None:
            first = recipe.parts[0][0] if isinstance(recipe, _Stack) else None
            target = self._natural_dtype(first, stored_dtype) if first else getattr(torch, stored_dtype)
        else:
            target = dtype
        if isinstance(recipe, _Half):
            intermediate = shape[1]
            piece = self._handle(recipe.source).get_slice(recipe.source)
            part = piece[:, recipe.half * intermediate : (recipe.half + 1) * intermediate]
            return part.to(device=device, dtype=target, copy=True)
        out = torch.empty(shape, dtype=target, device=device)
        if isinstance(recipe, _Concat):
            column = 0
            for source in recipe.sources:
                part = self._stored(source)
                out[:, column : column + part.shape[1]].copy_(part)
                column += part.shape[1]
            return out
        for e, parts in enumerate(recipe.parts):
            row = 0
            for part_name in parts:
                part = self._value(part_name)
                out[e, row : row + part.shape[0]].copy_(part)
                row += part.shape[0]
        return out

    def raw(self, name: str) -> RawTensor:
        """The tensor's float32/float16/bfloat16 bytes (stacked first for virtual expert names)."""
        storage = self.info(name).storage
        ggml_type = _GGML_OF_DTYPE.get(getattr(torch, storage, None))
        if ggml_type is None:
            raise SafetensorsFormatError(
                f"{name!r} in {self.description} is stored as {storage}; raw bytes are only available for "
                "float32/float16/bfloat16 tensors. Use an operator that loads it with load() instead, or "
                "convert the checkpoint to bfloat16."
            )
        tensor = self._stored(name) if name in self._files else self.load(name)
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        data.flags.writeable = False
        return RawTensor(name, ggml_type, tuple(tensor.shape), data)

    def close(self) -> None:
        """Drop the open shard handles (their memory maps go once no tensor uses them)."""
        self._handles.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsSource({self.description!r})"


def _dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str, where: str
) -> torch.Tensor:
    """DeepSeek-V3-style FP8 weights: each `block` of the weight times its ``weight_scale_inv`` entry."""
    block_rows, block_cols = block
    expected = None
    if weight.dim() == 2:
        expected = (-(-weight.shape[0] // block_rows), -(-weight.shape[1] // block_cols))
    if expected is None or tuple(scale_inv.shape) != expected:
        raise SafetensorsFormatError(
            f"cannot dequantize FP8 {name!r} in {where}: a {list(weight.shape)} weight in {block_rows}×{block_cols} "
            f"blocks needs a {list(expected) if expected else '2-D'} scale, got {list(scale_inv.shape)}; check "
            "quantization_config.weight_block_size in config.json"
        )
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return weight.float() * scale


def _fp8_block_size(folder: Path) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` from the checkpoint's config.json; DeepSeek-V3's 128×128 if absent."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        rows, cols = config["quantization_config"]["weight_block_size"]
        if isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0:
            return rows, cols
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return DEFAULT_FP8_BLOCK


def _nbytes(shape: tuple[int, ...], dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name, None)
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize if isinstance(dtype, torch.dtype) else 0


# -- locating the files -------------------------------------------------------------


def _locate(path: Path) -> dict[str, Path]:
    """Tensor name → shard file, from the index or the single file's header."""
    if not path.exists():
        raise KtUserError(f"safetensors checkpoint {path} does not exist")
    if path.is_dir():
        path = _pick_in_dir(path)
    if path.name.endswith(".json"):
        return _read_index(path)
    if path.suffix != ".safetensors":
        raise KtUserError(f"{path} is neither a .safetensors file, a safetensors index (.json) nor a folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise SafetensorsFormatError(
            f"cannot open safetensors file {path}: {e}; it is corrupt or incomplete, download it again"
        ) from None
    return dict.fromkeys(names, path)


def _pick_in_dir(folder: Path) -> Path:
    for candidate in (folder / INDEX_NAME, folder / SINGLE_NAME):
        if candidate.is_file():
            return candidate
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(indexes) > 1:
        found = indexes
    elif len(files) == 1:
        return files[0]
    elif files:
        found = files
    else:
        raise KtUserError(f"no safetensors checkpoint in {folder}: expected {SINGLE_NAME} or {INDEX_NAME}")
    raise KtUserError(
        f"{folder} holds several safetensors files but no {INDEX_NAME} that says how they belong "
        f"together ({', '.join(p.name for p in found[:5])}{'…' if len(found) > 5 else ''}); "
        "pass the file or index to use"
    )


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFormatError(f"cannot read safetensors index {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsFormatError(
            f"{index} has no valid \"weight_map\" (an object of tensor name → shard file name); "
            "it is not a safetensors index or is corrupt"
        )
    shards = {name: index.parent / name for name in set(weight_map.values())}
    missing = sorted(name for name, p in shards.items() if not p.is_file())
    if missing:
        raise SafetensorsFormatError(
            f"{index} names {len(missing)} shard(s) not in {index.parent}: "
            f"{', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}; download the missing files"
        )
    return {name: shards[shard] for name, shard in weight_map.items()}


# -- virtual expert tensors ---------------------------------------------------------


def _expert_recipes(stored: dict[str, Path]) -> tuple[dict[str, _Recipe], dict[str, str]]:
    """Virtual expert tensor names → how to build them, and names that cannot be built → why.

    Works from names alone (no shard is opened); shapes are checked when a tensor is read.
    """
    per_expert: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    stacked: dict[str, dict[str, str]] = defaultdict(dict)
    for name in stored:
        m = _PER_EXPERT.match(name)
        if m:
            per_expert[m["prefix"]][m["proj"]][int(m["index"])] = name
            continue
        m = _STACKED.match(name)
        if m:
            stacked[m["prefix"]][m["proj"]] = name

    virtual: dict[str, _Recipe] = {}
    broken: dict[str, str] = {}

    def offer(name: str, recipe: _Recipe) -> None:
        if name not in stored:
            virtual[name] = recipe

    for prefix, projections in per_expert.items():
        count = 1 + max(max(by_index) for by_index in projections.values())
        complete: dict[str, list[str]] = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            by_index = projections.get(proj, {})
            missing = [e for e in range(count) if e not in by_index]
            if missing:
                reason = (
                    f"{prefix} has {count} experts but no {proj} for expert(s) "
                    f"{', '.join(map(str, missing[:8]))}{'…' if len(missing) > 8 else ''}; the checkpoint is incomplete"
                )
                broken[f"{prefix}.{proj}"] = reason
                if proj != "down_proj":
                    broken[f"{prefix}.gate_up_proj"] = reason
                continue
            complete[proj] = [by_index[e] for e in range(count)]
        for proj, names in complete.items():
            offer(f"{prefix}.{proj}", _Stack(tuple((n,) for n in names)))
        if "gate_proj" in complete and "up_proj" in complete:
            pairs = zip(complete["gate_proj"], complete["up_proj"], strict=True)
            offer(f"{prefix}.gate_up_proj", _Stack(tuple((g, u) for g, u in pairs)))

    for prefix, projections in stacked.items():
        if "gate_up_proj" in projections:
            for half, proj in enumerate(("gate_proj", "up_proj")):
                offer(f"{prefix}.{proj}", _Half(projections["gate_up_proj"], half))
        elif "gate_proj" in projections and "up_proj" in projections:
            offer(f"{prefix}.gate_up_proj", _Concat((projections["gate_proj"], projections["up_proj"])))
    for name in virtual:
        broken.pop(name, None)
    return virtual, broken
