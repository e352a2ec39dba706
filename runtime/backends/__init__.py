"""Backends: the Backend interface, the KV cache, onnxruntime (plain and fused graph), TensorRT, providers, engine cache."""
