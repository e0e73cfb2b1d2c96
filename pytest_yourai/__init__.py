"""pytest-yourai: MLX LoRA/QLoRA fine-tuning memory benchmarks as pytest tests."""

__version__ = "0.1.0"
