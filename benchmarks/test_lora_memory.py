"""The pytest-yourai benchmark suite: one LoRA memory probe per model preset.

pytest benchmarks/                  # every preset that fits this machine
pytest benchmarks/ -k tiny          # the CPU-sized presets only
pytest benchmarks/ --yourai-force   # run presets even when pre-flight says no
"""

from pytest_yourai.benchmark import YouraiBenchmark


def test_lora_memory(yourai_benchmark: YouraiBenchmark) -> None:
    result = yourai_benchmark.run()
    assert result["status"] == "ok"
