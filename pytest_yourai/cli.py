"""The ``yourai`` console script: ``yourai estimate|probe|log|compare|fit|check ...`` runs the
same code as ``python -m pytest_yourai.estimate``, ``python -m pytest_yourai.probe``,
``python -m pytest_yourai.log``, ``python -m pytest_yourai.compare``,
``python -m pytest_yourai.fit`` and ``python -m pytest_yourai.check``. Each subcommand's
module is imported only when it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _estimate_main(argv: list[str]) -> int:
    from pytest_yourai.estimate import estimate_main

    return estimate_main(argv)


def _log_main(argv: list[str]) -> int:
    from pytest_yourai.diagnose import main as log_main

    return log_main(argv)


def _probe_main(argv: list[str]) -> int:
    from pytest_yourai.probe import main as probe_main  # imports mlx: only in this command

    return probe_main(argv)


def _compare_main(argv: list[str]) -> int:
    from pytest_yourai.compare import main as compare_main

    return compare_main(argv)


def _check_main(argv: list[str]) -> int:
    from pytest_yourai.check import main as check_main

    return check_main(argv)


def _fit_main(argv: list[str]) -> int:
    from pytest_yourai.fit import main as fit_main

    return fit_main(argv)


SUBCOMMANDS = {
    "estimate": _estimate_main,
    "probe": _probe_main,
    "log": _log_main,
    "compare": _compare_main,
    "fit": _fit_main,
    "check": _check_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``yourai SUBCOMMAND ...``: the package's command lines under one name."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        sys.stderr.write(f"usage: yourai {{{names}}} [options]  (yourai SUBCOMMAND --help)\n")
        return 2
    return SUBCOMMANDS[args[0]](args[1:])
