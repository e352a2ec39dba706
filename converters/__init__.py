"""Conversion pipeline: GPTQ int4 quantization, ONNX export, accuracy gate, TensorRT build, bundle writing."""
