"""Deployment: ONNX export with a parity check, int8 quantization, and torch-free inference.

`export.infer` and `export.metadata` import neither torch nor torchvision, so a board can run
`gefl infer` with only the `infer` extra (onnxruntime, numpy, pillow) installed.
"""
