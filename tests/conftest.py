"""Shared fixtures: tiny DeepSeek-architecture checkpoints and the bundles converted from them.

- ``tiny_model_dir(arch)``: a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json) of a random-weight Qwen2ForCausalLM ("qwen2", DeepSeek-R1-Distill-Qwen) or
  LlamaForCausalLM ("llama", R1-Distill-Llama / deepseek-llm) with hidden 256, intermediate 512,
  2 layers, 4 heads, 2 KV heads and a ~1k-token byte-level BPE tokenizer. Built once per session;
  treat it as read-only (copy it before changing anything).
- ``tiny_bundle(arch)``: that checkpoint converted once per session (GPTQ int4, group 128) into a
  verified release bundle. Read-only as well.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

TINY_CONVERT = dict(nsamples=8, seqlen=128, eval_tokens=256, progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edge_sdk.converters.tiny import build_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, Path] = {}

    def make(arch: str = "qwen2") -> Path:
        if arch not in cache:
            cache[arch] = build_model_dir(root / arch, arch, seed=0)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    from edge_sdk.converters import convert

    root = tmp_path_factory.mktemp("tiny-bundles")
    cache: dict[str, Path] = {}

    def make(arch: str = "qwen2") -> Path:
        if arch not in cache:
            out = root / arch
            convert(tiny_model_dir(arch), out, **TINY_CONVERT)
            cache[arch] = out
        return cache[arch]

    return make


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A writable copy of a tiny checkpoint: model_copy("llama")."""

    def make(arch: str = "qwen2") -> Path:
        dst = tmp_path / f"{arch}-copy"
        shutil.copytree(tiny_model_dir(arch), dst)
        return dst

    return make
