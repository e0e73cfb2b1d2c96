"""``python -m pytest_yourai.probe`` (the package's ``__init__`` has read the CUDA meter)."""

import sys

from pytest_yourai.probe import main

sys.exit(main())
