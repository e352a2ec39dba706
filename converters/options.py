"""Conversion settings: one dataclass, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edge_sdk.errors import ConfigError

METHODS = ("gptq", "rtn")
GRAPH_DTYPES = ("fp32", "fp16")


def is_cuda_name(device: str) -> bool:
    """cuda or cuda:N, the names torch.device accepts for a CUDA device."""
    return device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())


@dataclass(frozen=True)
class ConvertOptions:
    method: str = "gptq"  # "gptq" (GPTQModel) or "rtn" (round-to-nearest, a fast baseline)
    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.05
    act_order: str = "act_group_aware"  # or "none"; desc_act permutations are never written
    seed: int = 0
    calib: str | None = None  # text or JSONL file; default: the SDK's calibration set
    nsamples: int = 32
    seqlen: int = 512
    eval_text: str | None = None  # held-out text for the accuracy report
    eval_tokens: int = 1024
    embed_dtype: str = "fp16"
    lm_head_dtype: str = "int4"  # "int4" (group_size, round-to-nearest) or "fp16"
    graphs: tuple[str, ...] = ("fp32",)
    max_ppl_increase: float | None = None  # percent
    min_top1_agreement: float | None = None  # fraction of held-out tokens whose argmax matches the float model's
    sign_key: str | None = None
    overwrite: bool = False
    verify: bool = True
    progress: bool = True
    work_dir: str | None = None  # per-layer results (resumable); default: <output>.work beside the bundle
    keep_work: bool = False  # keep the work directory after a finished bundle
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"
    devices: tuple[str, ...] = ()  # several GPUs: cuda:0,cuda:1
    dry_run: bool = False  # quantize the first layer only and predict peak RAM, disk and time

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.bits != 4:
            raise ConfigError(f"bits={self.bits}: the bundle format stores int4 weights only", hint="use bits=4")
        if self.group_size <= 0 or self.group_size % 32:
            raise ConfigError(f"group_size must be a positive multiple of 32, got {self.group_size}", hint="the default is 128")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent}", hint="0.01-0.1 is usual")
        if self.act_order not in ("act_group_aware", "none"):
            raise ConfigError(f"act_order {self.act_order!r}: choose act_group_aware or none",
                              hint="desc_act permutations break contiguous int4 groups and are not written")
        if self.nsamples <= 0 or self.seqlen < 8 or self.eval_tokens < 8:
            raise ConfigError(f"nsamples ({self.nsamples}) must be > 0, seqlen ({self.seqlen}) and eval_tokens ({self.eval_tokens}) >= 8")
        if self.embed_dtype not in ("fp16",):
            raise ConfigError(f"embed_dtype {self.embed_dtype!r}: only fp16 embeddings are written")
        if self.lm_head_dtype not in ("int4", "fp16"):
            raise ConfigError(f"lm_head_dtype {self.lm_head_dtype!r}: choose int4 or fp16")
        bad = [g for g in self.graphs if g not in GRAPH_DTYPES] or ([] if self.graphs else ["(none)"])
        if bad:
            raise ConfigError(f"graphs {bad}: choose from {', '.join(GRAPH_DTYPES)} (fp32 for the CPU provider, fp16 for TensorRT/CUDA)")
        if "fp16" in self.graphs and self.group_size not in (64, 128):
            raise ConfigError(f"group_size {self.group_size} with the fp16 graph: TensorRT runs INT4 blocks of 64 or 128 only",
                              hint="use --group-size 128 (or 64) for GPU boards")
        if "fp32" not in self.graphs:
            raise ConfigError("the fp32 graph is always written (the CPU provider and the in-pipeline check use it)",
                              hint="pass graphs=('fp32', 'fp16')")
        for f in (self.calib, self.eval_text, self.sign_key):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{f}: no such file")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise ConfigError(f"max_ppl_increase must be >= 0 (percent), got {self.max_ppl_increase}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError(f"min_top1_agreement must be a fraction in [0, 1], got {self.min_top1_agreement}",
                              hint="0.9 means 90 % of held-out tokens keep the float model's top-1 prediction")

        if self.device not in ("auto", "cpu") and not is_cuda_name(self.device):
            raise ConfigError(f"device {self.device!r}: choose auto, cpu, cuda or cuda:N")
        bad = [d for d in self.devices if not is_cuda_name(d)]
        if bad:
            raise ConfigError(f"devices {bad}: --devices lists CUDA devices (cuda:0,cuda:1)", hint="use --device cpu for the CPU")

    def to_dict(self) -> dict:
        return asdict(self)
