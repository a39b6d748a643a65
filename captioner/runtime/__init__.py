"""Fast CPU inference: the encoder in ONNX Runtime (fp32, int8), OpenVINO (bf16, int8) or TorchScript, the fused
decoder step, and the choice of precision per CPU. Built from the model stage's modules; captions are checked
against them in the tests."""
