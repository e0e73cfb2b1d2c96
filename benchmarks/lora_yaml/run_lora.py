"""``python -m mlx_lm.lora -c CONFIG`` with a recorder around it: what benchmarks/lora_yaml.py
runs, one process per config.

    python benchmarks/lora_yaml/run_lora.py RECORD.json -c CONFIG.yaml [other mlx_lm.lora args]

Everything after RECORD.json goes to mlx_lm.lora's own ``main()`` as its command line, so the
YAML is read, merged and run by mlx-lm unchanged. Before that, this patches three names and
nothing else:

- the batch iterator. ``mlx_lm.tuner.trainer.train`` and ``evaluate`` take it as the default
  of their ``iterate_batches`` parameter, bound when the module was defined, so patching the
  module attribute alone would not reach them: the function in their ``__defaults__`` is
  swapped for a recorder that yields exactly what mlx-lm's iterator yields and notes each
  batch's shape, which loop asked for it (train: the dataset ``train`` was given, or
  ``loop=True``; valid: the other) and ``mx.get_peak_memory()`` at that moment;
- ``mlx_lm.lora.train`` (the name ``train_model`` calls), to pass a training callback.
  ``lora.run`` overwrites its ``training_callback`` argument with the reporting callbacks of
  ``report_to`` (None without it), and after mlx-lm 0.31.3 the console no longer prints
  "Peak mem": the only place it still reports the peak is the ``peak_memory`` (GB, 1e9) of
  ``on_train_loss_report``, ``mx.get_peak_memory() / 1e9`` at every ``steps_per_report`` and
  at the last iteration (never reset). The recorder keeps each report and chains any callback
  mlx-lm passed;
- ``mlx_lm.lora.print_trainable_parameters``, to keep the counts it prints (exact integers),
  and ``mlx_lm.lora.run``, to keep the arguments mlx-lm merged from the YAML and its defaults.

At exit, however it ends, RECORD.json gets one JSON object: status ("ok" or "error"), the
error, the reports, ``mx.get_peak_memory()`` at the end, the process's peak RSS (VmHWM and
ru_maxrss), the batch shapes in order and the longest training batch.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Where a GPU answers NVML: the device footprint, measured as the probe measures it
# (pytest_yourai.footprint), read once before mlx makes its CUDA context. On CPU the record's
# VmHWM is the footprint, and no meter runs (it would reset VmHWM per phase).
METER: Any = None

RECORD: dict[str, Any] = {
    "status": "started",
    "error": None,
    "train_batches": [],
    "valid_batches": [],
    "other_batches": [],
    "peak_memory_reports": [],
    "train_reports": [],
    "val_reports": [],
}
_ROLES: dict[int, str] = {}


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def install() -> None:
    import mlx.core as mx
    import mlx_lm
    import mlx_lm.lora as lora
    import mlx_lm.tuner.trainer as trainer

    RECORD["versions"] = {
        "mlx_lm": mlx_lm.__version__,
        "mlx": mx.__version__,
        "python": sys.version.split()[0],
    }
    original_iterate = trainer.iterate_batches

    def role_of(dataset: Any, args: tuple, kwargs: dict) -> str:
        if id(dataset) in _ROLES:
            return _ROLES[id(dataset)]
        loop = kwargs.get("loop", args[3] if len(args) > 3 else False)
        return "train" if loop else "other"

    def recording_iterate_batches(*args: Any, **kwargs: Any):
        dataset = kwargs.get("dataset", args[0] if args else None)
        role = role_of(dataset, args, kwargs)
        shapes = RECORD[f"{role}_batches"]
        for item in original_iterate(*args, **kwargs):
            batch = item[0]
            shapes.append(
                {"shape": list(batch.shape), "peak_gb": round(mx.get_peak_memory() / 1e9, 6)}
            )
            yield item

    recording_iterate_batches.__wrapped__ = original_iterate  # type: ignore[attr-defined]
    for function in (trainer.train, trainer.evaluate):
        defaults = function.__defaults__ or ()
        if original_iterate not in defaults:
            raise RuntimeError(f"{function.__qualname__} does not default to iterate_batches")
        function.__defaults__ = tuple(
            recording_iterate_batches if d is original_iterate else d for d in defaults
        )
    trainer.iterate_batches = recording_iterate_batches

    class Recorder(trainer.TrainingCallback):
        def __init__(self, wrapped: Any = None) -> None:
            self.wrapped = wrapped

        def on_train_loss_report(self, info: dict) -> None:
            RECORD["peak_memory_reports"].append(info.get("peak_memory"))
            RECORD["train_reports"].append(
                {
                    key: info.get(key)
                    for key in ("iteration", "train_loss", "trained_tokens", "peak_memory")
                }
            )
            if self.wrapped is not None:
                self.wrapped.on_train_loss_report(info)

        def on_val_loss_report(self, info: dict) -> None:
            RECORD["val_reports"].append(
                {
                    "iteration": info.get("iteration"),
                    "val_loss": info.get("val_loss"),
                    "mx_peak_gb": round(mx.get_peak_memory() / 1e9, 6),
                }
            )
            if self.wrapped is not None:
                self.wrapped.on_val_loss_report(info)

    original_train = lora.train

    def recording_train(*args: Any, **kwargs: Any) -> Any:
        train_dataset = kwargs.get("train_dataset", args[2] if len(args) > 2 else None)
        val_dataset = kwargs.get("val_dataset", args[3] if len(args) > 3 else None)
        _ROLES[id(train_dataset)] = "train"
        if val_dataset is not None:
            _ROLES[id(val_dataset)] = "valid"
        RECORD["train_rows"] = len(train_dataset) if train_dataset is not None else None
        RECORD["valid_rows"] = len(val_dataset) if val_dataset is not None else None
        RECORD["callback_from_mlx_lm"] = type(kwargs.get("training_callback")).__name__
        kwargs["training_callback"] = Recorder(kwargs.get("training_callback"))
        RECORD["mx_peak_before_train_gb"] = round(mx.get_peak_memory() / 1e9, 6)
        RECORD["mx_active_before_train_gb"] = round(mx.get_active_memory() / 1e9, 6)
        if METER is not None:
            METER.phase("train")
        return original_train(*args, **kwargs)

    lora.train = recording_train

    original_print = lora.print_trainable_parameters

    def recording_print(model: Any) -> None:
        from mlx.utils import tree_flatten
        from mlx_lm.utils import get_total_parameters

        RECORD["trainable_parameters"] = int(
            sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        )
        RECORD["total_parameters"] = int(get_total_parameters(model))
        original_print(model)

    lora.print_trainable_parameters = recording_print

    original_run = lora.run

    def recording_run(args: Any, *rest: Any, **kwargs: Any) -> Any:
        RECORD["args"] = {
            key: value
            for key, value in vars(args).items()
            if isinstance(value, (str, int, float, bool, list, dict, type(None)))
        }
        return original_run(args, *rest, **kwargs)

    lora.run = recording_run


def start_meter() -> None:
    global METER
    if sys.platform == "darwin":
        return
    from pytest_yourai.footprint import FootprintMeter, early_cuda_meter, source_for

    cuda = early_cuda_meter()
    if cuda is not None:
        METER = FootprintMeter(source_for("cuda", cuda)).start("build")


def finish(path: Path, started: float) -> None:
    if METER is not None:
        RECORD["footprint"] = METER.stop()
    try:
        import mlx.core as mx

        RECORD["mx_peak_end_gb"] = round(mx.get_peak_memory() / 1e9, 6)
    except Exception:
        RECORD["mx_peak_end_gb"] = None
    reports = [r for r in RECORD["peak_memory_reports"] if r is not None]
    RECORD["mlx_peak_gb"] = round(max(reports), 6) if reports else None
    hwm = vm_hwm_bytes()
    RECORD["vm_hwm_gb"] = round(hwm / 1e9, 6) if hwm is not None else None
    scale = 1 if sys.platform == "darwin" else 1024
    RECORD["ru_maxrss_gb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, 6
    )
    train = [b["shape"] for b in RECORD["train_batches"]]
    RECORD["longest_train_batch"] = max(train, key=lambda s: (s[1], s[0])) if train else None
    valid = [b["shape"] for b in RECORD["valid_batches"]]
    RECORD["longest_valid_batch"] = max(valid, key=lambda s: (s[1], s[0])) if valid else None
    RECORD["wall_s_inside"] = round(time.perf_counter() - started, 3)
    path.write_text(json.dumps(RECORD))


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    record_path = Path(sys.argv[1])
    started = time.perf_counter()
    code = 0
    try:
        start_meter()
        install()
        import mlx_lm.lora as lora

        sys.argv = ["mlx_lm.lora", *sys.argv[2:]]
        lora.main()
        RECORD["status"] = "ok"
    except BaseException as error:
        if isinstance(error, SystemExit) and not error.code:
            RECORD["status"] = "ok"
        else:
            RECORD["status"] = "error"
            RECORD["error"] = f"{type(error).__name__}: {error}"[:2000]
            RECORD["traceback_tail"] = traceback.format_exc()[-1500:]
            code = 1
    finally:
        finish(record_path, started)
    return code


if __name__ == "__main__":
    sys.exit(main())
