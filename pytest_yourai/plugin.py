"""pytest-yourai's entry point: hook functions and fixtures only.

``pytest_configure`` builds the run's ``YouraiSession`` and registers the hooks for this
process's roles, the pytest-xdist way: ``WorkerHooks`` where tests run (an xdist worker,
or a single process), ``ControllerHooks`` where they are reported (the xdist controller,
or a single process), pytest-html's columns where pytest-html is, and ``TimeLimits`` for
pytest-timeout's timer. The work is done by the modules those classes use.
"""

from __future__ import annotations

import pytest

from pytest_yourai import hookspec
from pytest_yourai.benchmark import YouraiBenchmark
from pytest_yourai.controller import ControllerHooks, HtmlReportHooks
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.presets import Preset
from pytest_yourai.search import SearchBenchmark
from pytest_yourai.session import PRESET_ARG, YouraiSession
from pytest_yourai.settings import MARKER_HELP, add_options, check_marker, disabled, resolve
from pytest_yourai.timelimits import TimeLimits
from pytest_yourai.worker import PREFLIGHT_KEY, WorkerHooks

SESSION_KEY = pytest.StashKey[YouraiSession]()
PLUGIN_NAME = "yourai-session"
DISABLED = pytest.mark.skip(reason="pytest-yourai is turned off (--yourai-disable)")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if config.option.help:
        return
    try:
        if disabled(config):
            return
        session = YouraiSession.from_config(config, resolve(config))
    except YouraiUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session
    plugins = config.pluginmanager
    plugins.register(WorkerHooks(session), PLUGIN_NAME + "-worker")
    plugins.register(TimeLimits(), PLUGIN_NAME + "-timelimits")
    if not session.is_worker:
        plugins.register(ControllerHooks(session), PLUGIN_NAME)
        if plugins.hasplugin("html"):
            plugins.register(HtmlReportHooks(session), PLUGIN_NAME + "-html")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A typo in the yourai marker's keywords is a usage error, not silently ignored."""
    for item in items:
        for marker in item.iter_markers("yourai"):
            problem = check_marker(marker.args, marker.kwargs)
            if problem is not None:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.yourai{problem}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if PRESET_ARG not in metafunc.fixturenames:
        return
    if SESSION_KEY not in metafunc.config.stash:  # turned off: the benchmarks are skipped
        metafunc.parametrize(PRESET_ARG, [pytest.param(None, marks=DISABLED, id="off")])
        return
    presets = metafunc.config.stash[SESSION_KEY].presets
    metafunc.parametrize(PRESET_ARG, presets, ids=[p.name for p in presets])


@pytest.fixture
def yourai_preset(request: pytest.FixtureRequest) -> Preset:
    """The preset under test; the plugin parametrizes it over the selected presets."""
    raise pytest.UsageError(
        "yourai_preset is parametrized by pytest-yourai; it cannot be used here"
    )


@pytest.fixture
def yourai_benchmark(request: pytest.FixtureRequest, yourai_preset: Preset) -> YouraiBenchmark:
    """The pre-flighted preset; call ``.run()`` to run the MLX LoRA probe (with
    ``--yourai-search``: to find the largest config that fits)."""
    session = request.config.stash[SESSION_KEY]
    kind = SearchBenchmark if session.settings.search else YouraiBenchmark
    return kind(request.node, session, request.node.stash[PREFLIGHT_KEY])
