"""``python -m pytest_yourai.log``: the crash diagnosis, kept under its released name
(the code is in diagnose.py)."""

from __future__ import annotations

import sys

from pytest_yourai.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
