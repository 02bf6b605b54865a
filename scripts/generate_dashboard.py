"""Write Mini-Claude's Grafana dashboard (`deploy/grafana/dashboards/mini-claude.json`) from a table of panels.

Usage: python scripts/generate_dashboard.py [--check]   (--check: exit 1 if the file on disk is out of date)

The dashboard is generated, as vLLM generates its own (`tools/generate_grafana_dashboards.py`), so it cannot
drift from the metric names: `tests/server/test_monitoring.py` checks that the file equals this script's
output, that every query parses (promql-parser) and that every metric it names is one a live server exposes.
A panel per area of the server: traffic, errors, latency, generation, the scheduler, the KV cache, adapters
and fine-tunes, voice, predictions. Areas without metrics on this server (retrieval) have no panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "mini-claude.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # deploy/grafana/provisioning/datasources
WINDOW = "$__rate_interval"


def quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket[{WINDOW}])))"


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""


ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Requests per second by route", (
            (f"sum by (route) (rate(mini_claude_http_requests_total[{WINDOW}]))", "{{route}}"),), "reqps"),
        Panel("Errors per second by type", (
            (f"sum by (type) (rate(mini_claude_errors_total[{WINDOW}]))", "{{type}}"),), "reqps",
            "Error responses (http_4xx/5xx) and failed generations or database calls."),
        Panel("5xx error ratio", (
            (f'sum(rate(mini_claude_http_requests_total{{status=~"5.."}}[{WINDOW}])) '
             f"/ sum(rate(mini_claude_http_requests_total[{WINDOW}]))", "5xx / all"),), "percentunit"),
        Panel("Request latency p50 / p95", (
            (quantile(0.5, "mini_claude_http_request_duration_seconds"), "p50"),
            (quantile(0.95, "mini_claude_http_request_duration_seconds"), "p95"),), "s",
            "From the request to the last byte of the response (streams included)."),
        Panel("Requests in flight", (("sum(mini_claude_http_requests_in_flight)", "in flight"),)),
    ]),
    ("Generation", [
        Panel("Time to first token p50 / p95", (
            (quantile(0.5, "mini_claude_time_to_first_token_seconds"), "p50"),
            (quantile(0.95, "mini_claude_time_to_first_token_seconds"), "p95"),), "s"),
        Panel("Tokens per second", (
            (f"sum(rate(mini_claude_generated_tokens_total[{WINDOW}]))", "generated"),
            (f"sum(rate(mini_claude_prompt_tokens_total[{WINDOW}]))", "prompt (prefilled)"),), "short",
            "Server-wide throughput."),
        Panel("Decode speed per sequence p50", (
            (quantile(0.5, "mini_claude_decode_tokens_per_second"), "p50"),), "short",
            "Tokens/s of one sequence after its first token."),
        Panel("Finished sequences by reason", (
            (f"sum by (finish_reason) (rate(mini_claude_sequences_total[{WINDOW}]))", "{{finish_reason}}"),
            (f"sum(rate(mini_claude_sequences_failed_total[{WINDOW}]))", "failed"),), "ops"),
    ]),
    ("Scheduler and KV cache", [
        Panel("Queue", (
            ("sum(mini_claude_scheduler_waiting)", "waiting"),
            ("sum(mini_claude_scheduler_running)", "running"),)),
        Panel("KV-cache memory", (
            ("sum(mini_claude_kv_cache_bytes)", "resident"),
            ("sum(mini_claude_kv_cache_used_bytes)", "used by running sequences"),
            ("sum(mini_claude_kv_cache_cached_bytes)", "prefix cache only"),), "bytes"),
        Panel("Prefix-cache hit ratio", (
            (f"sum(rate(mini_claude_prefix_cache_hits_total[{WINDOW}])) "
             f"/ sum(rate(mini_claude_prefix_cache_lookups_total[{WINDOW}]))", "hits / lookups"),), "percentunit"),
        Panel("Response cache", (
            (f"sum(rate(mini_claude_response_cache_hits_total[{WINDOW}]))", "hits"),
            (f"sum(rate(mini_claude_response_cache_misses_total[{WINDOW}]))", "misses"),), "ops"),
    ]),
    ("Adapters and fine-tunes", [
        Panel("LoRA adapters served", (("sum(mini_claude_adapters_loaded)", "adapters"),)),
        Panel("Fine-tune jobs submitted", (
            ("sum(increase(mini_claude_fine_tune_jobs_submitted_total[1h]))", "per hour"),)),
    ]),
    ("Voice", [
        Panel("Time to first audio p95", (
            (quantile(0.95, "mini_claude_speech_time_to_first_audio_seconds", "engine"), "{{engine}}"),), "s"),
        Panel("Speech real-time factor", (
            (f"sum by (engine) (rate(mini_claude_speech_synthesis_seconds_total[{WINDOW}])) "
             f"/ sum by (engine) (rate(mini_claude_speech_audio_seconds_total[{WINDOW}]))", "{{engine}}"),), "short",
            "Seconds of work per second of speech (below 1: faster than real time)."),
        Panel("Audio transcribed", (
            (f"sum(rate(mini_claude_transcription_audio_seconds_total[{WINDOW}]))", "audio s / s"),)),
        Panel("Audio cache", (
            (f"sum(rate(mini_claude_audio_cache_hits_total[{WINDOW}]))", "hits"),
            (f"sum(rate(mini_claude_audio_cache_misses_total[{WINDOW}]))", "misses"),), "ops"),
    ]),
    ("Predictions", [
        Panel("Prediction requests by model", (
            (f"sum by (model, status) (rate(mini_claude_prediction_requests_total[{WINDOW}]))",
             "{{model}} {{status}}"),), "reqps"),
        Panel("Prediction latency p50 / p95", (
            (quantile(0.5, "mini_claude_prediction_duration_seconds"), "p50"),
            (quantile(0.95, "mini_claude_prediction_duration_seconds"), "p95"),), "s"),
        Panel("Instances predicted", (
            (f"sum by (model) (rate(mini_claude_prediction_instances_total[{WINDOW}]))", "{{model}}"),), "ops"),
        Panel("Prediction log", (
            (f"sum by (outcome) (rate(mini_claude_prediction_log_rows_total[{WINDOW}]))", "{{outcome}}"),), "ops",
            "Rows written to the database off the request path, or dropped (queue full, database down)."),
        Panel("Model cache", (
            (f"sum(rate(mini_claude_model_cache_loads_total[{WINDOW}]))", "loads"),
            (f"sum(rate(mini_claude_model_cache_load_failures_total[{WINDOW}]))", "failed loads"),), "ops"),
    ]),
]  # fmt: skip


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model: a collapsed-free row per area, three panels across."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row):
            panels.append(_panel(panel, pid, 8 * (i % 3), y + 8 * (i // 3)))
            pid += 1
        y += 8 * ((len(row) + 2) // 3)
    return {
        "uid": "mini-claude",
        "title": "Mini-Claude",
        "description": "Generated by scripts/generate_dashboard.py; edit that, not this file.",
        "tags": ["mini-claude"],
        "timezone": "browser",
        "editable": False,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/generate_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
