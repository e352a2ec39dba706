"""Tensors of a checkpoint read one at a time from its safetensors shards (memory-mapped).

A sharded checkpoint names its shards in model.safetensors.index.json ("weight_map": tensor -> file);
a directory without an index is read by listing every *.safetensors file. Nothing here holds more than
the tensor asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_sdk.errors import ConversionError

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")


class TensorSource:
    """name -> tensor, from the shards of one checkpoint directory."""

    def __init__(self, path: Path, shards: list[Path]):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        index = self.path / INDEX
        if index.exists():
            self._read_index(index)
        else:
            for shard in shards:
                for name in self._handle(shard).keys():
                    self._where[name] = shard

    def _read_index(self, index: Path) -> None:
        try:
            wm = json.loads(index.read_text())["weight_map"]
            assert isinstance(wm, dict)
        except (ValueError, KeyError, AssertionError, TypeError) as exc:
            raise ConversionError(f"{index}: not a shard index (no \"weight_map\" object)",
                                  hint="re-save the checkpoint, or remove the index to read every *.safetensors file") from exc
        for name, fname in wm.items():
            shard = self.path / str(fname)
            if not shard.is_file() or Path(str(fname)).name != str(fname):
                raise ConversionError(f"{index}: shard {fname!r} (holding {name}) is missing from {self.path}",
                                      hint="download the complete checkpoint (every file the index names)")
            self._where[name] = shard

    def _handle(self, shard: Path):
        from safetensors import safe_open

        # a fresh handle per read: a kept one leaves every page read mapped (and counted in RSS)
        try:
            return safe_open(str(shard), framework="pt")
        except Exception as exc:  # noqa: BLE001 - a damaged shard is one line
            raise ConversionError(f"{shard}: not a readable safetensors file ({exc})",
                                  hint="download the shard again") from exc

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def _dtype(self, name: str) -> str:
        return self._handle(self._where[name]).get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None, *, rows: slice | None = None):
        """One tensor in its stored dtype; `shape` (when given) is checked first; `rows` reads a row range."""
        if name not in self._where:
            raise ConversionError(f"{self.path}: tensor {name} is missing from the checkpoint", hint="is the checkpoint complete?")
        sl = self._handle(self._where[name]).get_slice(name)
        got, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if shape is not None and got != tuple(shape):
            raise ConversionError(f"{self._where[name].name}: {name} has shape {list(got)}, config.json implies {list(shape)}",
                                  hint="the weights do not match config.json: download both from the same revision")
        if dtype not in FLOAT_DTYPES and not name.endswith((".qweight", ".qzeros", ".g_idx")):
            raise ConversionError(f"{self._where[name].name}: {name} is stored as {dtype}, expected a float type ({', '.join(FLOAT_DTYPES)})",
                                  hint="convert from the original float checkpoint")
        try:
            return sl[rows] if rows is not None else sl[:]
        except Exception as exc:  # noqa: BLE001 - a truncated shard fails here
            raise ConversionError(f"{self._where[name]}: cannot read {name} ({exc})", hint="download the shard again") from exc


def embedding_rows(src: TensorSource, name: str, shape: tuple[int, int], ids, chunk_rows: int):
    """src[name][ids] (any shape of ids) read `chunk_rows` rows at a time: the table is never whole in memory."""
    import torch

    flat = ids.reshape(-1)
    out = None
    for a in range(0, shape[0], chunk_rows):
        hit = (flat >= a) & (flat < a + chunk_rows)
        if bool(hit.any()):
            part = src.get(name, shape, rows=slice(a, a + chunk_rows))
            out = out if out is not None else torch.empty(flat.numel(), shape[1], dtype=part.dtype)
            out[hit] = part[flat[hit] - a]
    return out.reshape(*ids.shape, shape[1])


def expected_shapes(shape, arch, layer: int | None) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} config.json implies for one decoder layer (layer=i) or the ends (layer=None)."""
    h, v = shape.hidden_size, shape.vocab_size
    if layer is None:
        return {arch.embed: (v, h), arch.final_norm: (h,), arch.lm_head: (v, h)}
    q, kv, i = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {arch.norm(layer, "input_norm"): (h,), arch.norm(layer, "post_attn_norm"): (h,)}
    for p, d in dims.items():
        out[f"{arch.linear(layer, p)}.weight"] = d
        if shape.qkv_bias and p in ("q_proj", "k_proj", "v_proj"):
            out[f"{arch.linear(layer, p)}.bias"] = (d[0],)
    return out


def layer_tensors(src: TensorSource, shape, arch, layer: int) -> dict:
    """Every tensor of decoder layer `layer`, shapes checked, in the stored dtype."""
    return {n: src.get(n, s) for n, s in expected_shapes(shape, arch, layer).items()}
