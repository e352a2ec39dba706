"""The ceiling onnxruntime's int4 kernel sets on decode speed: a chain of MatMulNBits with the
DeepSeek-R1-Distill-Qwen-1.5B MLP shapes (1536 -> 8960 -> 1536, block 128, accuracy level 4) whose
weights exceed the last-level cache, run at batch 1, with and without huge pages. Reported as weight
bytes streamed per second and as the decode tokens/s that rate allows for a given bytes-per-token;
also one projection with its weights prepacked against the same weights fed as a graph input.

    python benchmarks/bench_int4_kernel.py [--pairs 40] [--bytes-per-token 820600832] [--json]

(820 600 832 = what the fused graph of a 1.5B bundle reads per token: int4 weights, fp32 scales, lm_head.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_chain(path: Path, pairs: int, hidden: int, inner: int, block: int, level: int) -> int:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x, total = [], [], "X", 0
    for p in range(pairs):
        for k, n, name in ((hidden, inner, f"up{p}"), (inner, hidden, f"down{p}")):
            b = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
            s = (rng.random(n * (k // block)) * 1e-3).astype(np.float32)
            inits += [numpy_helper.from_array(b, f"{name}.B"), numpy_helper.from_array(s, f"{name}.scales")]
            total += b.nbytes + s.nbytes
            nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.B", f"{name}.scales"], [f"{name}.Y"], domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=block, accuracy_level=level))
            x = f"{name}.Y"
    g = helper.make_graph(nodes, "int4-chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, hidden])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, hidden])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data")
    return total


def run(path: Path, threads: int, huge: bool, repeats: int) -> float:
    import numpy as np
    import onnxruntime as ort

    from edge_sdk.runtime.backends import hugepages

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    before = hugepages.anonymous_regions()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if huge:
        hugepages.advise_new(before)
    x = np.random.default_rng(1).random((1, sess.get_inputs()[0].shape[1])).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"X": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"X": x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def weights_as_input_vs_prepacked(hidden: int, inner: int, block: int, level: int, threads: int, repeats: int = 20) -> dict:
    """One hidden x inner projection at batch 1: weights as an initializer (prepacked at load) against
    the same weights fed as a graph input (what an executor binding streamed weights gets)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    b = rng.integers(0, 256, (inner, hidden // block, block // 2), dtype=np.uint8)
    s = (rng.random(inner * (hidden // block)) * 1e-3).astype(np.float32)
    x = rng.random((1, hidden)).astype(np.float32)
    out = {}
    for name, as_input in (("prepacked_ms", False), ("weights_as_input_ms", True)):
        node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=hidden, N=inner, bits=4,
                                block_size=block, accuracy_level=level)
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, hidden])]
        inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")]
        if as_input:
            inputs += [helper.make_tensor_value_info("B", TensorProto.UINT8, list(b.shape)),
                       helper.make_tensor_value_info("S", TensorProto.FLOAT, list(s.shape))]
            inits = []
        g = helper.make_graph([node], "one", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, inner])], initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {"X": x, **({"B": b, "S": s} if as_input else {})}
        sess.run(None, feed)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        out[name] = round(1000 * statistics.median(times), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=40, help="up/down pairs (40: 558 MiB, past a 480 MB L3)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--inner", type=int, default=8960)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--level", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--bytes-per-token", type=int, default=820_600_832)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from edge_sdk.runtime.generate.bench import read_bandwidth_gbps

    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chain.onnx"
        total = build_chain(path, args.pairs, args.hidden, args.inner, args.block, args.level)
        result = {"threads": threads, "weight_bytes": total, "load_before": list(os.getloadavg()),
                  "read_bandwidth_gbps": round(read_bandwidth_gbps(threads, mb_per_thread=512), 2)}
        for huge in (False, True):
            dt = run(path, threads, huge, args.repeats)
            rate = total / dt
            result["huge_pages" if huge else "small_pages"] = {
                "seconds": round(dt, 5), "gbps": round(rate / 1e9, 2),
                "decode_tokens_per_s_ceiling": round(rate / args.bytes_per_token, 2)}
        result["one_projection"] = weights_as_input_vs_prepacked(args.hidden, args.inner, args.block, args.level, threads)
    result["load_after"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.pairs} x ({args.hidden}->{args.inner}->{args.hidden}) MatMulNBits, block {args.block}, level {args.level}: "
          f"{total / 2**20:.0f} MiB of weights, {threads} threads; all-core read bandwidth {result['read_bandwidth_gbps']} GB/s")
    for k in ("small_pages", "huge_pages"):
        r = result[k]
        print(f"{k:12s} {1000 * r['seconds']:7.1f} ms -> {r['gbps']:5.1f} GB/s -> at {args.bytes_per_token / 2**20:.0f} MiB per token "
              f"at most {r['decode_tokens_per_s_ceiling']:.1f} tokens/s")
    one = result["one_projection"]
    print(f"one {args.hidden}x{args.inner} projection: {one['prepacked_ms']} ms prepacked, {one['weights_as_input_ms']} ms "
          "with the weights fed as a graph input")
    print(f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
