"""Checks inside the pipeline: ONNX vs PyTorch on the same int4 weights, and int4 vs float accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch

from edge_sdk.errors import AccuracyGateError, ConversionError

LOGIT_ATOL = 1e-3  # fp32 graph vs fp32 PyTorch, same weights: only summation order differs


def ort_session(path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # exact int4 matmul (the default accuracy level 4 quantizes activations to int8)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(ids, mask, pos, past):
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i in range(len(past) // 2):
        feeds[f"past_key_values.{i}.key"] = past[2 * i].numpy()
        feeds[f"past_key_values.{i}.value"] = past[2 * i + 1].numpy()
    return feeds


def check_onnx(path, reference, shape, calib_ids: list[list[int]], *, seed: int = 0, steps: int = 4) -> dict:
    """Prefill a padded batch of two, then decode `steps` greedy tokens with the KV cache, in both
    onnxruntime and the PyTorch reference; logits must be close and greedy tokens equal."""
    sess = ort_session(path)
    g = torch.Generator().manual_seed(seed)
    n = min(16, len(calib_ids[0]))
    ids = torch.tensor([calib_ids[0][:n], calib_ids[-1][:n]], dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, : n // 4] = 0  # left padding on the second row
    ids[1, : n // 4] = int(torch.randint(0, shape.vocab_size, (1,), generator=g))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past_t = reference.empty_past(2)
    past_o = [p.clone() for p in past_t]
    worst, greedy_t, greedy_o = 0.0, [], []
    for _ in range(steps + 1):
        with torch.no_grad():
            out_t = reference(ids, mask, pos, *past_t)
        out_o = sess.run(None, _feeds(ids, mask, pos, past_o))
        valid = mask[:, -ids.shape[1]:].bool()
        diff = np.abs(out_t[0].numpy() - out_o[0])[valid.numpy()]
        worst = max(worst, float(diff.max()))
        last = out_t[0][:, -1]
        nt, no = last.argmax(-1), torch.from_numpy(out_o[0][:, -1]).argmax(-1)
        # a different argmax only counts when it is not a tie within the logit tolerance
        tie = last.gather(-1, no.unsqueeze(-1)).squeeze(-1) >= last.max(-1).values - LOGIT_ATOL
        greedy_t.append(nt.tolist())
        greedy_o.append(torch.where(tie, nt, no).tolist())
        past_t, past_o = list(out_t[1:]), [torch.from_numpy(x) for x in out_o[1:]]
        ids = nt.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
    if worst > LOGIT_ATOL or greedy_t != greedy_o:
        raise ConversionError(f"exported graph disagrees with the PyTorch model: max |logit diff| {worst:.2e} "
                              f"(limit {LOGIT_ATOL}), greedy tokens {greedy_o} vs {greedy_t}",
                              hint="this is a converter bug: report it with the model's config.json")
    return {"max_abs_logit_diff": worst, "greedy_tokens_equal": True, "decode_steps": steps}


def nll(model, tokens: list[int], bos: int | None, window: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood and argmax predictions over `tokens`, in windows."""
    if len(tokens) < 8:
        raise ConversionError(f"held-out text has only {len(tokens)} tokens", hint="pass a longer --eval-text")
    nlls, preds = [], []
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = tokens[start: start + window]
        if len(chunk) < 2:
            break
        ids = torch.tensor([([bos] if bos is not None else []) + chunk])
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids, mask, pos, *model.empty_past(1))[0][0].float()
        off = 1 if bos is not None else 0
        lp = torch.log_softmax(logits[off:-1], -1)
        target = ids[0, off + 1:]
        nlls.append(-lp.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        preds.append(logits[off:-1].argmax(-1))
    return torch.cat(nlls), torch.cat(preds)


def report(float_nll: tuple, quant_nll: tuple) -> dict:
    """Perplexity of both models on the same held-out tokens (from `nll`), and top-1 agreement."""
    (nf, pf), (nq, pq) = float_nll, quant_nll
    ppl_f, ppl_q = math.exp(nf.mean().item()), math.exp(nq.mean().item())
    return {
        "eval_tokens": int(nf.numel()),
        "ppl_float": round(ppl_f, 4),
        "ppl_quant": round(ppl_q, 4),
        "ppl_increase_percent": round(100 * (ppl_q / ppl_f - 1), 3),
        "nll_float": round(nf.mean().item(), 5),
        "nll_quant": round(nq.mean().item(), 5),
        "top1_agreement": round((pf == pq).float().mean().item(), 4),
    }


GATE_HINT = ("use more or more representative calibration data (--calib, --nsamples), a smaller --group-size, "
             "or --lm-head-dtype fp16")


def settle(report: dict, opts, reference: str = "float checkpoint") -> None:
    """Record what the report was measured against and the limits asked for, then apply the gate."""
    report["reference"] = reference
    report["max_ppl_increase_percent"] = opts.max_ppl_increase
    report["min_top1_agreement"] = opts.min_top1_agreement
    gate(report, opts.max_ppl_increase, opts.min_top1_agreement)


def gate(report: dict, max_ppl_increase: float | None, min_top1_agreement: float | None) -> None:
    """Refuse a conversion whose accuracy report is past either limit (None: no limit)."""
    rise, top1 = report["ppl_increase_percent"], report["top1_agreement"]
    if max_ppl_increase is not None and rise > max_ppl_increase:
        raise AccuracyGateError(
            f"perplexity rose {rise:.2f}% (float {report['ppl_float']:.3f} -> int4 {report['ppl_quant']:.3f}), "
            f"above --max-ppl-increase {max_ppl_increase}%", hint=GATE_HINT)
    if min_top1_agreement is not None and top1 < min_top1_agreement:
        raise AccuracyGateError(
            f"top-1 agreement with the float model is {top1:.4f}, below --min-top1-agreement {min_top1_agreement}",
            hint=GATE_HINT)
