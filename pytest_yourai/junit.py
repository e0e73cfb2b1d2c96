"""JUnit XML: where a benchmark's figures go under each ``junit_family``.

xunit1 keeps the ``yourai_*`` properties on each testcase. xunit2 (pytest's default) allows no
properties per testcase, so the figures become the suite's properties, named by the test
(``yourai[<test id>].<field>``), and the testcase keeps none.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_yourai.results import PROP_PREFIX, ResultRow

# What goes into the JUnit suite's properties per test under xunit2.
SUITE_FIELDS = (
    "verdict",
    "preset",
    "in_flight",
    "estimated_base_gb",
    "estimated_conservative_gb",
    "available_gb",
    "footprint_peak_gb",
    "peak_memory_gb",
    "batch_size",
    "lora_rank",
    "lora_layers",
)
XUNIT2_WARNING = (
    "yourai: junit_family=xunit2 allows no properties per testcase, so the figures are the "
    "suite's properties, yourai[<test id>].<field>; junit_family=xunit1 puts them on each "
    "testcase"
)


def xunit2_writer(config: pytest.Config) -> Any:
    """pytest's JUnit writer when --junitxml is on with junit_family xunit2, else None.
    (It is registered as a plugin; its add_global_property is what record_testsuite_property
    uses.)"""
    if not config.option.xmlpath or config.getini("junit_family") != "xunit2":
        return None
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "LogXML" and hasattr(plugin, "add_global_property"):
            return plugin
    return None


def without_our_properties(report: pytest.TestReport) -> None:
    """xunit2: the testcase keeps no ``yourai_*`` property."""
    report.user_properties = [
        (k, v) for k, v in report.user_properties if not str(k).startswith(PROP_PREFIX)
    ]


def add_suite_properties(writer: Any, row: ResultRow) -> None:
    for name in SUITE_FIELDS:
        value = row.verdict if name == "verdict" else row.get(name)
        if value is not None:
            writer.add_global_property(f"yourai[{row.nodeid}].{name}", str(value))
