"""Reading a local Hugging Face model directory: config, safetensors shards, tokenizer, hashes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_sdk.bundle import sha256_file
from edge_sdk.errors import ConversionError

from .archs import ArchTable, arch_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    arch: ArchTable
    name: str
    files: dict[str, str] = field(default_factory=dict)  # {file name: sha256} of weights, config and tokenizer

    @property
    def safetensors(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @property
    def quantization_config(self) -> dict | None:
        """GPTQ settings of an already-quantized checkpoint (config.json or quantize_config.json)."""
        qc = self.config.get("quantization_config")
        if qc is None and (self.path / "quantize_config.json").exists():
            qc = json.loads((self.path / "quantize_config.json").read_text())
        return qc


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    p = Path(model_dir)
    if not p.is_dir():
        raise ConversionError(f"{p}: not a model directory", hint="pass a local Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{p}: no config.json", hint="pass a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{cfg_path}: not valid JSON ({exc})") from exc
    arch = arch_for(config, str(cfg_path))
    shards = sorted(p.glob("*.safetensors"))
    if not shards:
        found = ", ".join(sorted(x.name for x in p.iterdir())[:8])
        raise ConversionError(f"{p}: no *.safetensors weights (found: {found})",
                              hint="save the model with safe_serialization=True; .bin pickles are not read")
    missing = [f for f in TOKENIZER_FILES if not (p / f).exists()]
    if missing:
        raise ConversionError(f"{p}: tokenizer file(s) missing: {', '.join(missing)}",
                              hint="copy tokenizer.json and tokenizer_config.json from the original model repository into the directory")
    files = {x.name: sha256_file(x) for x in [cfg_path, *shards, *(p / f for f in TOKENIZER_FILES)]}
    name = config.get("_name_or_path") or p.name
    return Checkpoint(p, config, arch, str(name), files)


def load_weights(ck: Checkpoint) -> dict:
    """All tensors of the checkpoint in their stored dtype (consumers cast one tensor at a time)."""
    from safetensors.torch import load_file

    out = {}
    for shard in ck.safetensors:
        out.update(load_file(shard))
    if ck.arch.lm_head not in out and ck.config.get("tie_word_embeddings"):
        out[ck.arch.lm_head] = out[ck.arch.embed]
    if ck.arch.embed not in out:
        raise ConversionError(f"{ck.path}: no {ck.arch.embed} in the weights", hint="is this a complete checkpoint?")
    return out
