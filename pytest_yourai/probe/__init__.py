"""The probe: a child program that measures what an mlx-lm LoRA fine-tune allocates.

This package is the only part of pytest_yourai that imports mlx / mlx_lm. The plugin runs it
as ``python -m pytest_yourai.probe`` with the run's settings as JSON in the environment
variable ``YOURAI_PROBE_SPEC``; each command-line flag overrides the matching field.

It builds the model with mlx-lm's own class for the config's ``model_type`` (synthetic,
shape-exact weights quantized block by block, or real weights when they are on disk), makes
it trainable as ``mlx_lm.lora`` does (LoRA or DoRA with ``linear_to_lora_layers``, or whole
blocks), and trains through mlx-lm's own trainer (``mlx_lm.tuner.trainer.train``: compiled
step, masked cross-entropy, its validations) on batches of random tokens: at full length, or
in the shapes mlx-lm's ``iterate_batches`` makes of the user's data. Progress goes to stdout,
flushed, line by line; the last line is ``BENCHMARK_RESULT: {json}``.

The parts, by job: ``spec`` (command line and spec), ``build`` (the model), ``census``,
``batches`` (iterate_batches replacements), ``train`` (adapters, optimizer, the trainer),
``measure`` (a measured run), ``errands`` (the short jobs), ``data`` (the data's batch
shapes), ``cli`` (main), ``shared`` (output, errors, the memory cap).
"""

from __future__ import annotations

import sys  # noqa: F401 - the probe's sys, as tests patch it (probe.sys.platform)

# First: the GPU's used memory is read before anything imports mlx.core (meter.py says why).
from pytest_yourai.probe.meter import CUDA_METER

# isort: split
from pytest_yourai.probe.batches import random_batches, shaped_batches, text_batches
from pytest_yourai.probe.build import (
    build_model,
    count_parameters,
    local_weights,
    quantize_predicate,
    trainable_parameter_count,
)
from pytest_yourai.probe.census import block_census, model_census
from pytest_yourai.probe.cli import main
from pytest_yourai.probe.errands import backend_name, device_info, errand, measure_throughput
from pytest_yourai.probe.measure import Phase, measure, run_probe
from pytest_yourai.probe.shared import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_OOM,
    EXIT_USAGE,
    GB,
    MemoryCap,
    ProbeOOM,
    classify_failure,
    emit_result,
    gb,
    process_peak_rss_gb,
    say,
)
from pytest_yourai.probe.spec import (
    BOUNDED_IN_FLIGHT_ENV,
    ECHOED_SPEC,
    apply_in_flight,
    build_parser,
    resolve_spec,
)
from pytest_yourai.probe.train import add_lora, build_optimizer, train_steps

__all__ = [
    "BOUNDED_IN_FLIGHT_ENV",
    "CUDA_METER",
    "ECHOED_SPEC",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_OOM",
    "EXIT_USAGE",
    "GB",
    "MemoryCap",
    "Phase",
    "ProbeOOM",
    "add_lora",
    "apply_in_flight",
    "backend_name",
    "block_census",
    "build_model",
    "build_optimizer",
    "build_parser",
    "classify_failure",
    "count_parameters",
    "device_info",
    "emit_result",
    "errand",
    "gb",
    "local_weights",
    "main",
    "measure",
    "measure_throughput",
    "model_census",
    "process_peak_rss_gb",
    "quantize_predicate",
    "random_batches",
    "resolve_spec",
    "run_probe",
    "say",
    "shaped_batches",
    "text_batches",
    "train_steps",
    "trainable_parameter_count",
]
