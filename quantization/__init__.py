"""quantization: turn FP32 PyTorch NLP models into low-precision variants and measure what each
one gains (size, speed) and loses (fidelity to FP32). Knows nothing about HTTP."""

__version__ = "0.1.0"
