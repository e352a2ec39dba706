"""The fused onnxruntime graph (contrib ops over repacked int4 weights), cached beside the bundle."""
