"""Sizing planner: will a DeepSeek model fit on a Jetson board, and how fast, at what power?

Everything here is arithmetic over a model's config and a board profile; the same ``QuantSpec``
describes what the converter writes, so planned and real bundle sizes agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .boards import Board, PowerMode, all_boards, get_board
from .bundle import bundle_quant_fields
from .errors import ConfigError
from .modelspec import (
    ModelShape,
    ParamCounts,
    attention_linears,
    count_params,
    layer_norm_params,
    load_config,
    mlp_linears,
    router_params,
    shape_from_config,
)

DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

# Fixed costs on the device. [unverified] CUDA context + TensorRT/onnxruntime libraries on L4T r36,
# and what a headless L4T image keeps for itself; correct them from `edge-sdk doctor` readings.
RUNTIME_OVERHEAD_MB = 600
OS_RESERVE_MB = 1024
PREFILL_EFFICIENCY = 0.35  # fraction of dense FP16 tensor throughput reached by int4 weight-only prefill [unverified]
# Fraction of the memory roofline (bandwidth / bytes read per step) that int4 decode reaches: published
# Jetson AGX Orin results for TensorRT-LLM reach about 88 %. [unverified on this SDK's own engines;
# `edge-sdk bench --board` prints the measured share beside the planner's bound]
DECODE_EFFICIENCY = 0.88
# Speculative verify: checking k draft tokens in one forward costs (1 + k * VERIFY_TOKEN_COST) single-token
# steps while the step stays bandwidth-bound (the weights are read once; each extra token adds dequant and
# attention work), and never less than the compute time of k + 1 tokens at the prefill rate. [unverified on a
# Jetson; benchmarks/bench_speculative.py measures the ratio on the machine it runs on]
VERIFY_TOKEN_COST = 0.04
SPEC_ACCEPTANCE = (0.5, 0.7, 0.9)  # acceptance rates the plan tabulates
SPEC_K_MAX = 8

# Units: memory sizes in binary units (GiB = 2**30 bytes, MiB = 2**20), rates in decimal ones (GB/s = 1e9 bytes/s).
GIB = 2**30


@dataclass(frozen=True)
class QuantSpec:
    """How weights are stored: decoder linears at `bits` with symmetric group scales."""

    bits: int = 4
    group_size: int = 128
    scale_dtype: str = "fp16"
    embed_dtype: str = "fp16"
    lm_head_dtype: str = "int4"  # int4 uses the same group size as the decoder
    other_dtype: str = "fp16"  # norms, biases, router
    kv_dtype: str = "fp16"

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"bits must be 4, 8 or 16, got {self.bits}")
        if self.group_size <= 0 or self.group_size % 32:
            raise ConfigError(f"group_size must be a positive multiple of 32, got {self.group_size}", hint="the default is 128")
        for name in ("scale_dtype", "embed_dtype", "lm_head_dtype", "other_dtype", "kv_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {', '.join(DTYPE_BYTES)}")

    def matrix_bytes(self, in_features: int, out_features: int, dtype: str | None = None) -> int:
        """Bytes of one [out, in] weight: packed ints + one scale per group along `in`."""
        bits = self.bits if dtype is None else {"int4": 4, "int8": 8}.get(dtype)
        if bits is None or bits == 16:
            return int(in_features * out_features * DTYPE_BYTES[dtype or "fp16"])
        groups = -(-in_features // self.group_size)
        packed = (in_features * out_features * bits + 7) // 8
        return packed + groups * out_features * int(DTYPE_BYTES[self.scale_dtype])


@dataclass
class WeightBytes:
    embeddings: int
    attention: int
    mlp: int
    router: int
    norms_and_biases: int
    lm_head: int
    per_layer: list[int]  # bytes of each decoder layer (what the paging executor streams)
    read_per_token: int  # bytes of weights read to decode one token

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.router + self.norms_and_biases + self.lm_head


def weight_bytes(s: ModelShape, q: QuantSpec) -> WeightBytes:
    other = int(DTYPE_BYTES[q.other_dtype])
    attn = mlp = router = norms = 0
    per_layer: list[int] = []
    read = 0
    for i in range(s.num_layers):
        a = sum(q.matrix_bytes(l.in_features, l.out_features) + (l.out_features * other if l.bias else 0) for l in attention_linears(s))
        m_lin = mlp_linears(s, i)
        m = sum(l.count * q.matrix_bytes(l.in_features, l.out_features) for l in m_lin)
        m_active = sum(l.active * q.matrix_bytes(l.in_features, l.out_features) for l in m_lin)
        bias = s.n_routed_experts if s.router_bias and s.is_moe_layer(i) else 0  # V3's correction bias, stored fp32
        r = (router_params(s, i) - bias) * other + bias * int(DTYPE_BYTES["fp32"])
        n = layer_norm_params(s) * other
        attn, mlp, router, norms = attn + a, mlp + m, router + r, norms + n
        per_layer.append(a + m + r + n)
        read += a + m_active + r + n
    norms += s.hidden_size * other  # final norm
    embed = int(s.vocab_size * s.hidden_size * DTYPE_BYTES[q.embed_dtype]) if q.embed_dtype not in ("int4", "int8") else q.matrix_bytes(s.hidden_size, s.vocab_size, q.embed_dtype)
    shares_embedding = s.tie_word_embeddings and q.lm_head_dtype == q.embed_dtype
    lm_head = 0 if shares_embedding else q.matrix_bytes(s.hidden_size, s.vocab_size, q.lm_head_dtype)
    lm_read = embed if shares_embedding else lm_head
    embed_row = embed // s.vocab_size
    read += s.hidden_size * other + lm_read + embed_row
    return WeightBytes(embed, attn, mlp, router, norms, lm_head, per_layer, read)


@dataclass
class ModeEstimate:
    mode_id: int
    mode: str
    budget_w: float
    bandwidth_gbps: float  # GB/s (1e9 bytes/s)
    decode_tokens_per_s: float  # what to expect, whole batch: the bound x DECODE_EFFICIENCY in memory, the paged speed when paged, 0 when neither
    prefill_tokens_per_s: float
    joules_per_token: float  # the mode's power budget / decode_tokens_per_s
    paged_decode_tokens_per_s: float | None = None
    decode_bound_tokens_per_s: float = 0.0  # memory roofline with the weights in memory: bandwidth / bytes read per step


@dataclass
class Plan:
    model: str
    architecture: str
    board: str
    board_title: str
    context: int
    batch: int
    quant: dict
    params: dict
    weight_bytes: dict
    kv_bytes_per_token: int
    kv_bytes: int
    workspace_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    usable_bytes: int
    headroom_bytes: int
    fits: bool
    bytes_read_per_token: int
    modes: list[ModeEstimate]
    selected_mode: str
    storage: str
    paged: dict | None = None
    notes: list[str] = field(default_factory=list)
    speculative: dict | None = None  # with a draft: see speculative_estimate

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def bundled_configs() -> list[str]:
    root = resources.files("edge_sdk.data").joinpath("configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def resolve_model(model: str | Path | dict) -> tuple[dict, str]:
    """A config dict from a dict, a model/bundle directory, a config.json, or a bundled config name."""
    if isinstance(model, dict):
        return model, model.get("_name_or_path", "config")
    p = Path(model)
    if not p.exists() and str(model) in bundled_configs():
        text = resources.files("edge_sdk.data").joinpath("configs", f"{model}.json").read_text()
        return json.loads(text), str(model)
    if p.is_dir() and (p / "manifest.json").exists():
        from .bundle import read_manifest

        manifest = read_manifest(p)  # one BundleError for a corrupt manifest
        cfg = manifest.get("source", {}).get("config")
        if isinstance(cfg, dict):
            return cfg, str(model)
    if not p.exists():
        raise ConfigError(
            f"{model}: no such model directory, config.json or bundled config",
            hint=f"bundled configs: {', '.join(bundled_configs())}",
        )
    cfg, path = load_config(p)
    return cfg, str(path)


def workspace_bytes(s: ModelShape, batch: int, prefill_chunk: int, act_bytes: int = 2) -> int:
    """Activations of one prefill chunk: logits (fp32) for the last position of each sequence,
    attention scores for the chunk against the context, MLP intermediates, a few hidden states."""
    tokens = batch * prefill_chunk
    inter = max(s.intermediate_size, s.moe_intermediate_size * max(1, s.num_experts_per_tok))
    hidden_like = tokens * (4 * s.hidden_size + 3 * inter) * act_bytes
    scores = batch * s.num_heads * prefill_chunk * prefill_chunk * 4
    logits = batch * s.vocab_size * 4
    return hidden_like + scores + logits


def plan(
    model: str | Path | dict,
    board: str = "agx-orin-64gb",
    *,
    context: int = 4096,
    batch: int = 1,
    bits: int = 4,
    group_size: int = 128,
    mode: int | str | None = None,
    storage: str | None = None,
    quant: QuantSpec | None = None,
    prefill_chunk: int = 512,
    draft: str | Path | dict | None = None,
) -> Plan:
    """Size `model` on `board`: memory, verdict, decode/prefill speed bound per power mode.
    With `draft`: the speculative-decoding speedup per mode as a function of the acceptance rate."""
    if draft is not None:
        target = plan(model, board, context=context, batch=batch, bits=bits, group_size=group_size, mode=mode,
                      storage=storage, quant=quant, prefill_chunk=prefill_chunk)
        d = plan(draft, board, context=context, batch=1, bits=bits, group_size=group_size, mode=mode,
                 storage=storage, quant=quant, prefill_chunk=prefill_chunk)
        vocab = tuple(shape_from_config(*resolve_model(x)).vocab_size for x in (model, draft))
        target.speculative = speculative_estimate(target, d, vocab)
        return target
    if context <= 0 or batch <= 0:
        raise ConfigError(f"context and batch must be positive (got context={context}, batch={batch})")
    cfg, name = resolve_model(model)
    s = shape_from_config(cfg, name)
    b = get_board(board)
    q = quant or QuantSpec(**(bundle_quant_fields(model) or {"bits": bits, "group_size": group_size}))
    selected = b.mode(mode)
    store = storage or b.default_storage
    if store not in b.storage:
        raise ConfigError(f"board {b.name} has no storage {store!r}", hint=f"choose one of: {', '.join(b.storage)}")

    params = count_params(s)
    wb = weight_bytes(s, q)
    kv_per_token = int(s.kv_elements_per_token() * DTYPE_BYTES[q.kv_dtype])
    kv = kv_per_token * context * batch
    ws = workspace_bytes(s, batch, min(prefill_chunk, context))
    overhead = RUNTIME_OVERHEAD_MB * 2**20
    total = wb.total + kv + ws + overhead
    usable = (b.mem_total_mb - OS_RESERVE_MB) * 2**20
    fits = total <= usable
    # decode reads the weights once per step and, per sequence, the KV cache at the full context
    read_per_step = wb.read_per_token + kv_per_token * context * batch

    paged = None
    if not fits:
        if s.spec.moe and q.bits == 4:
            paged = expert_paged_estimate(s, q, b, store, usable - kv - ws - overhead)
        else:
            paged = paged_estimate(s, wb, b, store, usable - kv - ws - overhead)
    modes = []
    for m in b.power_modes:
        bw = b.mode_bandwidth_gbps(m) * 1e9
        bound = batch * bw / read_per_step
        decode = bound * DECODE_EFFICIENCY
        prefill = b.mode_fp16_tflops(m) * 1e12 * PREFILL_EFFICIENCY / (2 * params.active_per_token + 4 * s.num_layers * context * s.num_heads * s.head_dim // 2)
        pd = None
        if paged and paged["feasible"]:
            pd = min(decode, batch * paged["storage_bytes_per_s"] / max(1, paged["bytes_paged_per_token"]))
        expect = decode if not paged else (pd or 0.0)  # a model that does not fit runs at the paged speed or not at all
        modes.append(ModeEstimate(m.id, m.name, m.budget_w, round(bw / 1e9, 1), round(expect, 3 if paged else 2), round(prefill, 1),
                                  round(m.budget_w / expect, 3) if expect else float("inf"), round(pd, 3) if pd is not None else None,
                                  round(bound, 2)))

    notes = []
    if s.spec.moe:
        notes.append(f"MoE: {params.total/1e9:.1f}B parameters in total, {params.active_per_token/1e9:.2f}B read per token")
    if context > s.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {s.max_position_embeddings}")
    if b.unverified:
        notes.append(f"board figures marked unverified: {', '.join(b.unverified)}")
    return Plan(
        model=name, architecture=s.architecture, board=b.name, board_title=b.title, context=context, batch=batch,
        quant=asdict(q), params=params.as_dict(),
        weight_bytes={k: v for k, v in asdict(wb).items() if k != "per_layer"} | {"total": wb.total, "layer_max": max(wb.per_layer)},
        kv_bytes_per_token=kv_per_token, kv_bytes=kv, workspace_bytes=ws, runtime_overhead_bytes=overhead,
        total_bytes=total, usable_bytes=usable, headroom_bytes=usable - total, fits=fits,
        bytes_read_per_token=read_per_step, modes=modes, selected_mode=selected.name, storage=store, paged=paged, notes=notes,
    )


def fused_layer_bytes(s: ModelShape, q: QuantSpec) -> tuple[list[int], int] | None:
    """(bytes of each layer, bytes of lm_head + final norm) in the fused executor's sidecar, as
    runtime/backends/fused/weights.py writes it: q/k/v packed into one int4 matrix and gate/up into another, fp32
    scales and norms, every tensor page aligned. None where the fused graph does not apply (MoE, other than int4)."""
    from .paging_model import page_round as pr

    if s.spec.moe or q.bits != 4:
        return None

    def mat(i: int, o: int) -> int:
        return pr(i * o // 2) + pr(-(-i // q.group_size) * o * 4)

    h, qd, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    layer = (mat(h, qd + 2 * kv) + (pr((qd + 2 * kv) * 4) if s.qkv_bias else 0) + mat(qd, h)
             + mat(h, 2 * s.intermediate_size) + mat(s.intermediate_size, h) + pr(h * 4) + h * 4)  # the last norm unpadded
    head = mat(h, s.vocab_size) if q.lm_head_dtype == "int4" else pr(h * s.vocab_size * 2)
    return [layer] * s.num_layers, head + pr(h * 4)


def _scales(q: QuantSpec, in_features: int, out_features: int) -> int:
    return -(-in_features // q.group_size) * out_features * int(DTYPE_BYTES[q.scale_dtype])


def _expert_held(q: QuantSpec, in_features: int, out_features: int) -> int:
    """A paged expert's matrix as onnxruntime holds it: prepacked integers and its scales twice in fp32."""
    return q.matrix_bytes(in_features, out_features) + 3 * _scales(q, in_features, out_features)


def _resident_held(q: QuantSpec, in_features: int, out_features: int) -> int:
    """A resident int4 matrix as onnxruntime holds it: as loaded and prepacked, its scales also in fp32 twice."""
    return 2 * q.matrix_bytes(in_features, out_features) + 2 * _scales(q, in_features, out_features)


def expert_paged_estimate(s: ModelShape, q: QuantSpec, b: Board, storage: str, budget_for_weights: int) -> dict:
    """An MoE model over the budget pages its routed experts (runtime/paging/experts.py): attention,
    routers, shared experts, dense layers and lm_head resident as onnxruntime holds them (each int4
    matrix as loaded and prepacked, scales also in fp32 twice; fp16 tensors also as their fp32 copies),
    embedding rows read on demand, reads in flight, and a cache of experts in the rest. Routing is taken
    as uniform, the worst case for a cache: each token misses its k experts of a MoE layer at the rate
    of the experts not cached. The same sizes as the runtime's (tests/test_expert_paging.py)."""
    bw = b.storage[storage].read_mbps * 1e6
    h, mi, k = s.hidden_size, s.moe_intermediate_size, s.num_experts_per_tok
    other = int(DTYPE_BYTES[q.other_dtype])
    expert = 2 * _expert_held(q, h, mi) + _expert_held(q, mi, h)
    expert_read = 2 * q.matrix_bytes(h, mi) + q.matrix_bytes(mi, h)
    moe_layers = [i for i in range(s.num_layers) if s.is_moe_layer(i)]
    n_experts = len(moe_layers) * s.n_routed_experts
    resident = 0
    for i in range(s.num_layers):
        resident += sum(_resident_held(q, lin.in_features, lin.out_features) + (3 * lin.out_features * other if lin.bias else 0)
                        for lin in attention_linears(s))
        resident += sum(lin.count * _resident_held(q, lin.in_features, lin.out_features)
                        for lin in mlp_linears(s, i) if not lin.name.startswith("experts."))
        bias = s.n_routed_experts if s.router_bias and s.is_moe_layer(i) else 0
        resident += 3 * (router_params(s, i) - bias) * other + 4 * bias + 3 * layer_norm_params(s) * other
    resident += 3 * h * other  # final norm
    if not (s.tie_word_embeddings and q.lm_head_dtype == q.embed_dtype):
        resident += _resident_held(q, h, s.vocab_size) if q.lm_head_dtype == "int4" else 3 * s.vocab_size * h * other
    in_flight = 2 * max(k, 4) * (expert + expert_read)  # demand reads and read-ahead: a buffer and a build each
    cache = max(0, min(n_experts, (budget_for_weights - resident - in_flight) // expert))
    feasible = cache >= k
    share = cache / n_experts if n_experts else 1.0
    per_token = int(len(moe_layers) * k * expert_read * (1 - share))
    return {
        "feasible": feasible,
        "executor": "experts",
        "storage": storage,
        "storage_bytes_per_s": bw,
        "resident_layers": s.num_layers,
        "paged_layers": 0,
        "resident_bytes": int(resident),
        "cache_experts": int(cache),
        "routed_experts": n_experts,
        "bytes_paged_per_token": per_token,
        "decode_tokens_per_s": (bw / per_token if per_token else None) if feasible else None,
        "model": "routed experts cached, uniform routing",
    }


def paged_estimate(s: ModelShape, wb: WeightBytes, b: Board, storage: str, budget_for_weights: int,
                   executor: str = "standard", q: QuantSpec | None = None, probe=None) -> dict:
    """Layer streaming, with the paging executor's own plan (edge_sdk.paging_model): lm_head
    and norms resident, embedding rows read on demand, page-aligned layer buffers for prefetch, as
    many layers resident as fit (spread evenly), the rest read from storage on every token.

    executor "standard": the bundle graph's executor (weights bound as inputs; what the CUDA and
    TensorRT providers of a device run), two slots. "fused": the CPU provider's executor over the
    fused sidecar (runtime/paging/fused.py), two slots and three prepacked sessions; given a `probe`
    (edge_sdk.paging_model.BuildProbe: the session build and layer compute times measured where the
    executor runs), the plan the executor would choose and the executor's decode model with the
    board's storage speed, not the storage-only bound."""
    from dataclasses import replace

    from .errors import MemoryBudgetError
    from .paging_model import plan_paging, plan_pipelined

    bw = b.storage[storage].read_mbps * 1e6
    fused = fused_layer_bytes(s, q or QuantSpec()) if executor == "fused" else None
    if fused is None:
        probe = None
    elif probe is not None:
        probe = replace(probe, read_bytes_per_s=bw)
    try:
        if fused is not None:
            p = plan_pipelined(fused[0], fused[1], budget_for_weights, probe)
        else:
            p = plan_paging(wb.per_layer, wb.lm_head + s.hidden_size * 2, budget_for_weights)
    except MemoryBudgetError:
        p = None
    paged_bytes = p.bytes_paged_per_token if p else wb.total
    if p is None or not paged_bytes:
        tps = None
    else:
        tps = probe.tokens_per_s(p) if probe is not None else bw / paged_bytes
    return {
        "feasible": p is not None,
        "executor": "fused" if fused is not None else "standard",
        "storage": storage,
        "storage_bytes_per_s": bw,
        "resident_layers": len(p.resident) if p else 0,
        "paged_layers": len(p.paged) if p else s.num_layers,
        "bytes_paged_per_token": int(paged_bytes),
        "decode_tokens_per_s": tps,
        "model": "executor" if probe is not None else "storage",
    }


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verify step yields with k draft tokens each accepted with probability `acceptance`
    (independently): E = (1 - a^(k+1)) / (1 - a), from 1 (a = 0) to k + 1 (a = 1)."""
    if not 0 <= acceptance <= 1 or k < 0:
        raise ConfigError(f"acceptance must be in [0, 1] and k >= 0, got {acceptance}, {k}")
    return float(k + 1) if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def speculative_speedup(acceptance: float, k: int, draft_ratio: float, verify_ratio: float) -> float:
    """Decode speedup over plain decode: E tokens per (verify step + k draft steps), all in units of one
    plain target step. draft_ratio: a draft step's time / a target step's; verify_ratio: a k-token verify's."""
    return expected_tokens(acceptance, k) / (verify_ratio + k * draft_ratio)


def _verify_ratio(k: int, target: "ModeEstimate", compute_s_per_token: float) -> float:
    step = 1 / target.decode_tokens_per_s
    return max(1 + k * VERIFY_TOKEN_COST, (k + 1) * compute_s_per_token / step)


def speculative_estimate(target: Plan, draft: Plan, vocab: tuple[int, int] | None = None) -> dict:
    """Per power mode of the target's board: for each acceptance rate in SPEC_ACCEPTANCE, the k (1..SPEC_K_MAX)
    that maximises the speedup, the speedup and the decode tok/s; and the lowest acceptance at which
    speculation pays at all. The draft's own reads count: k draft steps per verify step."""
    if draft.weight_bytes["total"] >= target.weight_bytes["total"]:
        raise ConfigError(f"the draft {draft.model} ({_gib(draft.weight_bytes['total'])} of weights) is not smaller than "
                          f"the target {target.model} ({_gib(target.weight_bytes['total'])})",
                          hint="a draft must be a smaller model of the same family, e.g. deepseek-r1-distill-qwen-1.5b")
    dmodes = {m.mode: m for m in draft.modes}
    modes = []
    for m in target.modes:
        dm = dmodes[m.mode]
        if not m.decode_tokens_per_s or not dm.decode_tokens_per_s:
            modes.append({"mode": m.mode, "mode_id": m.mode_id, "feasible": False})
            continue
        ratio = m.decode_tokens_per_s / dm.decode_tokens_per_s  # a draft step / a target step
        compute = 1 / m.prefill_tokens_per_s if not target.paged and m.prefill_tokens_per_s else 0.0

        def best(a: float) -> tuple[int, float]:
            return max(((k, speculative_speedup(a, k, ratio, _verify_ratio(k, m, compute))) for k in range(1, SPEC_K_MAX + 1)),
                       key=lambda ks: ks[1])

        rows = []
        for a in SPEC_ACCEPTANCE:
            k, sp = best(a)
            rows.append({"acceptance": a, "k": k, "tokens_per_step": round(expected_tokens(a, k), 3), "speedup": round(sp, 3),
                         "decode_tokens_per_s": round(m.decode_tokens_per_s * sp, 2), "pays": sp > 1})
        pays_from = next((a / 100 for a in range(0, 100) if best(a / 100)[1] > 1), None)
        modes.append({"mode": m.mode, "mode_id": m.mode_id, "feasible": True, "draft_step_ratio": round(ratio, 4),
                      "base_decode_tokens_per_s": m.decode_tokens_per_s, "rows": rows, "pays_from_acceptance": pays_from})
    extra = draft.weight_bytes["total"] + draft.kv_bytes + draft.workspace_bytes
    fits = target.total_bytes + extra <= target.usable_bytes
    notes = []
    if vocab and abs(vocab[0] - vocab[1]) > 256:
        notes.append(f"the draft's vocabulary ({vocab[1]}) differs from the target's ({vocab[0]}) by more than padding: "
                     "the runtime refuses a draft whose tokenizer differs")
    if not fits:
        notes.append(f"target and draft together do not fit in memory (the draft adds {_gib(extra)})")
    return {"draft": draft.model, "draft_weight_bytes": draft.weight_bytes["total"], "draft_bytes_read_per_token": draft.bytes_read_per_token,
            "extra_bytes": extra, "fits_with_draft": fits,
            "verify_token_cost": VERIFY_TOKEN_COST, "modes": modes, "notes": notes}


def recommend(model, *, context: int = 4096, batch: int = 1, bits: int = 4, group_size: int = 128) -> list[tuple[Plan, ModeEstimate]]:
    """Boards and modes on which the model fits, fastest decode first."""
    out = []
    for b in all_boards():
        p = plan(model, b.name, context=context, batch=batch, bits=bits, group_size=group_size)
        if p.fits:
            out += [(p, m) for m in p.modes]
    return sorted(out, key=lambda pm: (-pm[1].decode_tokens_per_s, pm[1].budget_w))


def _mode_table(p: Plan) -> list[str]:
    """In memory: the roofline bound and the estimate at DECODE_EFFICIENCY of it. Paged: the paged speed only."""
    speed = "paged tok/s" if p.paged else "bound tok/s  decode tok/s"
    lines = [f"  mode            power  bandwidth  {speed}  prefill tok/s  J/token"]
    for m in p.modes:
        mark = "*" if m.mode == p.selected_mode else " "
        if not p.paged:
            cells = f"{m.decode_bound_tokens_per_s:>11.1f} {m.decode_tokens_per_s:>13.1f}"
        else:
            cells = f"{m.decode_tokens_per_s:>11.3g}" if m.decode_tokens_per_s else f"{'-':>11}"
        lines.append(f" {mark}{m.mode_id} {m.mode:<12} {m.budget_w:>4.0f} W {m.bandwidth_gbps:>6.1f} GB/s {cells} "
                     f"{m.prefill_tokens_per_s:>14.0f} {m.joules_per_token:>8.3f}")
    if not p.paged:
        lines.append(f"  bound: bandwidth / bytes read per step; decode: {DECODE_EFFICIENCY:.0%} of the bound "
                     "(TensorRT-LLM on AGX Orin, published)")
    return lines


def render(p: Plan) -> str:
    w, pc = p.weight_bytes, p.params
    lines = [
        f"{p.model} ({p.architecture}) on {p.board_title} [{p.board}]",
        f"  parameters     {pc['total']:,}  (embeddings {pc['embeddings']:,}, attention {pc['attention']:,}, "
        f"mlp {pc['mlp']:,}, router {pc['router']:,}, norms {pc['norms']:,}, lm_head {pc['lm_head']:,})",
        f"  read per token {pc['active_per_token']:,} parameters",
        f"  weights        {_gib(w['total'])} at int{p.quant['bits']} g{p.quant['group_size']} "
        f"(embeddings {p.quant['embed_dtype']} {_gib(w['embeddings'])}, lm_head {p.quant['lm_head_dtype']} {_gib(w['lm_head'])})",
        f"  KV cache       {p.kv_bytes_per_token:,} B/token x {p.context} tokens x batch {p.batch} = {_gib(p.kv_bytes)}",
        f"  workspace      {_gib(p.workspace_bytes)} + runtime {_gib(p.runtime_overhead_bytes)}",
        f"  total          {_gib(p.total_bytes)} of {_gib(p.usable_bytes)} usable -> "
        + ("FITS" if p.fits else "DOES NOT FIT") + f" (headroom {_gib(p.headroom_bytes)})",
        f"  bytes read per decode step {_gib(p.bytes_read_per_token)}",
    ]
    lines += _mode_table(p)
    if p.paged:
        pg = p.paged
        if pg["executor"] == "experts":
            if pg["feasible"]:
                tps = f"<= {pg['decode_tokens_per_s']:.3g} tok/s" if pg["decode_tokens_per_s"] else "no reads"
                lines.append(f"  paged from {pg['storage']}: routed experts through a cache of {pg['cache_experts']} of "
                             f"{pg['routed_experts']} (uniform routing), {_gib(pg['bytes_paged_per_token'])} read per token -> {tps}")
            else:
                lines.append("  paged: not feasible (the resident part + reads in flight + k experts exceed the budget)")
        elif pg["feasible"]:
            lines.append(f"  paged from {pg['storage']}: {pg['resident_layers']} layers resident, {pg['paged_layers']} streamed, "
                         f"{_gib(pg['bytes_paged_per_token'])} read per token -> <= {pg['decode_tokens_per_s']:.3g} tok/s")
        else:
            lines.append("  paged: not feasible (embeddings + lm_head + KV + two layer buffers exceed the budget)")
    lines += [f"  note: {n}" for n in p.notes]
    if p.speculative:
        lines += _speculative_table(p.speculative)
    return "\n".join(lines)


def _speculative_table(sp: dict) -> list[str]:
    """Per mode: speedup x, best k and tok/s at each tabulated acceptance; the acceptance from which it pays."""
    lines = [f"  speculative decoding with draft {sp['draft']} (+{_gib(sp['extra_bytes'])} of memory"
             + ("" if sp["fits_with_draft"] else ", DOES NOT FIT beside the target") + ")",
             "  mode          plain tok/s " + "".join(f"{f'acceptance {a}':>24}" for a in SPEC_ACCEPTANCE) + "   pays from"]
    for m in sp["modes"]:
        if not m["feasible"]:
            lines.append(f"  {m['mode']:<12} {'-':>12}  (no decode estimate for target or draft)")
            continue
        cells = "".join(f"{r['speedup']:>8.2f}x k={r['k']} {r['decode_tokens_per_s']:>7.1f}/s" for r in m["rows"])
        pays = f"a >= {m['pays_from_acceptance']:.2f}" if m["pays_from_acceptance"] is not None else "never"
        lines.append(f"  {m['mode']:<12} {m['base_decode_tokens_per_s']:>12.1f} {cells}   {pays}")
        for r in m["rows"]:
            if not r["pays"]:
                lines.append(f"    {m['mode']}: at acceptance {r['acceptance']} speculation does not pay "
                             f"({r['speedup']:.2f}x < 1): decode without the draft")
    lines.append(f"  speedup = E / (verify + k x draft step), E = (1 - a^(k+1)) / (1 - a) tokens per verify; a k-token verify "
                 f"costs 1 + {sp['verify_token_cost']} k plain steps [unverified], k = 1..{SPEC_K_MAX}")
    lines += [f"  note: {n}" for n in sp["notes"]]
    return lines
