"""The GPU's used memory before MLX makes its CUDA context.

Where the driver does not report per-process memory, the footprint is what the device uses
above this reading, so it must be taken before ``import mlx.core``: the package's
``__init__`` imports this module first, and Python runs that ``__init__`` before any module
of the package (every one of which may import mlx).
"""

from __future__ import annotations

import sys

from pytest_yourai.footprint import CudaMeter, early_cuda_meter

CUDA_METER: CudaMeter | None = early_cuda_meter() if sys.platform != "darwin" else None
