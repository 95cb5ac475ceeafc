"""Machine facts, the Markdown tables (pasteable into docs/performance.md) and the JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .brokers import Broker
from .scenarios import Measured, Metric, Params, Scenario

_PACKAGES = ("kombu-pg", "kombu", "celery", "psycopg", "amqp", "redis", "SQLAlchemy")

LEGEND = (
    "In parentheses: kombu_pg ÷ that row, measured in the same run. For throughputs (/s) "
    "above 1 means kombu_pg is faster; for latencies (ms) below 1 means kombu_pg is faster."
)


@dataclass
class Row:
    scenario: Scenario
    broker: Broker
    measured: Measured | None = None
    error: str | None = None

    @property
    def status(self) -> str | None:
        """Why there are no numbers, if there are none."""
        if self.broker.skip:
            return f"skipped: {self.broker.skip}"
        return f"failed: {self.error}" if self.error else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info(
    postgres: str, servers: dict[str, str], params: Params, quick: bool
) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick (smoke test, small N: not for publishing)" if quick else "full",
        "cpus": os.cpu_count(),
        "load average at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": postgres,
        **servers,
        "packages": ", ".join(f"{k} {v}" for k, v in package_versions().items()),
        "kombu-pg revision": git_revision(),
        "parameters": (
            f"Kombu N = {params.messages} messages (~{params.payload_bytes + 25} byte JSON body); "
            f"Celery N = {params.tasks} tasks; latency: up to {params.samples} samples or "
            f"{params.sample_budget_s:g} s per metric"
        ),
    }


def _number(value: float, metric: Metric) -> str:
    if metric.unit != "ms":
        return f"{value:,.0f}"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _reference(rows: list[Row]) -> dict[str, float]:
    for row in rows:
        if row.broker.is_reference and row.measured is not None:
            return row.measured.values
    return {}


def ratios(row: Row, reference: dict[str, float]) -> dict[str, float]:
    """kombu_pg's value divided by this row's, per metric both have."""
    if row.measured is None or row.broker.is_reference:
        return {}
    values = row.measured.values
    return {k: reference[k] / v for k, v in values.items() if k in reference and v > 0}


def _cell(row: Row, metric: Metric, reference: dict[str, float]) -> str:
    if row.measured is None or metric.key not in row.measured.values:
        return "–"
    text = _number(row.measured.values[metric.key], metric)
    ratio = ratios(row, reference).get(metric.key)
    if ratio is None:
        return text
    # Two decimals, or two significant digits for tiny ratios (1 s polling vs 4 ms).
    return f"{text} ({ratio:.2f}×)" if ratio >= 0.1 else f"{text} ({ratio:.2g}×)"


def markdown_table(scenario: Scenario, rows: list[Row]) -> str:
    reference = _reference(rows)
    lines = [
        f"### {scenario.title}",
        "",
        "| broker | " + " | ".join(m.header for m in scenario.metrics) + " | notes |",
        "|---|" + "---:|" * len(scenario.metrics) + "---|",
    ]
    for row in rows:
        notes = row.status or "; ".join(row.measured.notes if row.measured else [])
        cells = [_cell(row, m, reference) for m in scenario.metrics]
        # A "|" in a note (an error message, a log line) would split the Markdown cell.
        notes = notes.replace("|", "\\|")
        lines.append(f"| {scenario.row_label(row.broker)} | " + " | ".join(cells) + f" | {notes} |")
    return "\n".join(lines)


def markdown(info: dict[str, Any], sections: list[tuple[Scenario, list[Row]]]) -> str:
    parts = ["## kombu-pg benchmark", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in info.items()]
    for scenario, rows in sections:
        parts += ["", markdown_table(scenario, rows)]
    parts += ["", LEGEND, ""]
    return "\n".join(parts)


def to_json(
    info: dict[str, Any], params: Params, sections: list[tuple[Scenario, list[Row]]]
) -> str:
    results = []
    for scenario, rows in sections:
        reference = _reference(rows)
        for row in rows:
            results.append(
                {
                    "scenario": scenario.key,
                    "title": scenario.title,
                    "broker": row.broker.key,
                    "label": scenario.row_label(row.broker),
                    "values": row.measured.values if row.measured else {},
                    "ratios_kombu_pg_over_this": ratios(row, reference),
                    "units": {m.key: m.unit for m in scenario.metrics},
                    "notes": row.measured.notes if row.measured else [],
                    "status": row.status,
                }
            )
    run = {**info, "params": asdict(params)}
    return json.dumps({"run": run, "results": results}, indent=2)
