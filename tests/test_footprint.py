"""The footprint meter's bookkeeping, with a scripted source (no device needed), and the CPU
source for real."""

from __future__ import annotations

from pytest_yourai.footprint import FootprintMeter, Source, cpu_source

GB = 10**9


class Script:
    def __init__(self) -> None:
        self.now = 1 * GB
        self.high = 1 * GB
        self.resets = 0

    def set(self, value: int) -> None:
        self.now = value
        self.high = max(self.high, value)

    def reset(self) -> bool:
        self.resets += 1
        self.high = self.now
        return True


def test_a_resettable_high_water_mark_gives_each_phase_its_own_peak() -> None:
    script = Script()
    source = Source("scripted", lambda: script.now, lambda: script.high, script.reset)
    meter = FootprintMeter(source, interval_s=10.0).start("build")  # no sample lands
    script.set(5 * GB)  # a brief peak between samples
    script.set(2 * GB)
    meter.phase("train")
    script.set(3 * GB)
    report = meter.stop()
    assert report["build_footprint_gb"] == 5.0 and report["train_footprint_gb"] == 3.0
    assert report["footprint_peak_gb"] == 5.0 and report["footprint_high_water"] is True
    assert script.resets == 2


def test_a_lifetime_mark_counts_only_in_the_phase_where_it_rose() -> None:
    script = Script()
    source = Source("lifetime", lambda: script.now, lambda: script.high)  # never resets
    meter = FootprintMeter(source, interval_s=10.0).start("build")
    script.set(6 * GB)
    script.set(2 * GB)
    meter.phase("train")
    script.set(4 * GB)  # below the build's mark: only the samples tell
    report = meter.stop()
    assert report["build_footprint_gb"] == 6.0
    assert report["train_footprint_gb"] == 4.0  # the closing sample


def test_cpu_source_reads_this_process() -> None:
    source = cpu_source()
    current, high = source.current(), source.high_water()
    assert current and high and high >= current > 10**6
