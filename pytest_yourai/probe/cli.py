"""``python -m pytest_yourai.probe``: a short job (an errand) or a measured training run."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_yourai.probe.errands import errand
from pytest_yourai.probe.measure import measure
from pytest_yourai.probe.spec import build_parser, spec_or_exit


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    done = errand(args, parser)
    if done is not None:
        return done
    return measure(spec_or_exit(args, parser))
