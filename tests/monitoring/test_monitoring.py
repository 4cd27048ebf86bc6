"""The Grafana dashboard and the Prometheus alert rules (compose/grafana, compose/prometheus)
against a real Prometheus (Debian's `prometheus` package; tests/run installs it).

One stack for the module, no Docker: the simulated GPU host, supervisor A (both fixed URLs,
the gate on) that frees ComfyUI for an Ollama load, supervisor B (ComfyUI left to Docker
discovery, Docker unreachable: its events stream stays disconnected), and Prometheus on
127.0.0.1 (fixed port from this suite's range, its own TSDB in a tmp dir) scraping both every
second with alerts.yml loaded. Checked:
- `promtool check rules` / `check config` accept the shipped files;
- Prometheus scrapes `vram_supervisor_*` series (printed), every rule evaluates with health
  ok, and the one alert this stack deserves (B's events stream) is the only one active;
- promtool unit tests (alerts_test.yml): each alert fires when it should and not before;
- every metric the dashboard and the rules read is one the supervisors export, and every
  dashboard query runs on Prometheus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from supervisor.sim import SimHost
from tests.e2e.test_supervisor_on_sim import (
    Supervisor,
    free_port,
    hold_comfy_vram,
    start_supervisor,
    stop,
)
from tests.monitoring.promql import exported_names, metric_names

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "compose" / "prometheus" / "alerts.yml"
EXAMPLE_CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "compose" / "grafana" / "vram-supervisor-dashboard.json"
RULE_TESTS = Path(__file__).with_name("alerts_test.yml")
PROMETHEUS_PORT = 19500  # this suite's fixed-port range: 19500-19599
ALERTS = {
    "VramSupervisorDown",
    "VramSupervisorLoopStalled",
    "VramOllamaModelSpilled",
    "VramFreesFailing",
    "VramHealsFailing",
    "VramComfyUIRestarted",
    "VramDockerEventsDisconnected",
    "VramGateForwardedWithoutRoom",
}
# Series Prometheus itself makes for each target; any other name must be the supervisor's.
PROMETHEUS_OWN = {"up"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"no {name} (tests/run installs Debian's `prometheus` package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Stack:
    prometheus: str  # base URL
    a: Supervisor
    b: Supervisor
    metrics_a: str
    metrics_b: str

    def target(self, sup: Supervisor) -> str:
        return f"127.0.0.1:{sup.port}"


def api(base: str, path: str, **params: str) -> Any:
    r = httpx.get(f"{base}/api/v1/{path}", params=params, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (path, params, r.text)
    return body["data"]


def wait_until(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with SimHost(time_scale=0.1) as host, httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, host, model_gib=10.0)
        gate_port = free_port()
        a = start_supervisor(host, VRAM_GATE_PORT=str(gate_port), VRAM_GATE_HOST="127.0.0.1")
        # B: Ollama by fixed URL, ComfyUI left to Docker discovery (an empty value is unset),
        # and Docker unreachable.
        ollama_only = cast(SimHost, SimpleNamespace(ollama_url=host.ollama_url, comfyui_url=""))
        b = start_supervisor(ollama_only)
        proc: subprocess.Popen[bytes] | None = None
        try:
            a.wait_for("VRAM source: api")
            r = client.post(
                f"http://127.0.0.1:{gate_port}/api/generate", json={"model": "llama3.1:8b"}
            )
            assert r.status_code == 200, r.text
            a.wait_for("Freed ComfyUI memory")
            b.wait_for("Serving /healthz")
            config = tmp / "prometheus.yml"
            targets = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
            config.write_text(
                json.dumps(  # JSON is YAML
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(RULES)],
                        "scrape_configs": [
                            {
                                "job_name": "vram-supervisor",
                                "static_configs": [{"targets": targets}],
                            }
                        ],
                    }
                )
            )
            log = (tmp / "prometheus.log").open("wb")
            started = time.monotonic()
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            base = f"http://127.0.0.1:{PROMETHEUS_PORT}"

            def ready() -> bool:
                assert proc is not None and proc.poll() is None, (
                    tmp / "prometheus.log"
                ).read_text()
                try:
                    return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until("Prometheus to be ready", ready)
            wait_until(
                "both supervisors scraped",
                lambda: (
                    len(api(base, "query", query='up{job="vram-supervisor"} == 1')["result"]) == 2
                ),
            )
            print(f"\nPrometheus ready and both targets up in {time.monotonic() - started:.1f} s")
            yield Stack(
                base,
                a,
                b,
                httpx.get(f"http://127.0.0.1:{a.port}/metrics", timeout=5).text,
                httpx.get(f"http://127.0.0.1:{b.port}/metrics", timeout=5).text,
            )
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for sup in (a, b):
                stop(sup)


def test_promtool_accepts_the_rules_and_the_example_config() -> None:
    promtool = tool("promtool")
    rules = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout + rules.stderr
    config = subprocess.run(
        [promtool, "check", "config", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert config.returncode == 0, config.stdout + config.stderr


def test_prometheus_scrapes_the_supervisor(stack: Stack) -> None:
    series = api(stack.prometheus, "query", query='{__name__=~"vram_supervisor_.+"}')["result"]
    names = {s["metric"]["__name__"] for s in series}
    assert {
        "vram_supervisor_gpu_memory_used_bytes",
        "vram_supervisor_container_vram_bytes",
        "vram_supervisor_ollama_model_gpu_ratio",
        "vram_supervisor_frees_total",
        "vram_supervisor_gate_requests_total",
        "vram_supervisor_docker_events_connected",
    } <= names
    a = stack.target(stack.a)
    query = f'vram_supervisor_frees_total{{stage="soft",result="freed",instance="{a}"}}'
    [freed] = api(stack.prometheus, "query", query=query)["result"]
    assert float(freed["value"][1]) >= 1  # A's free, as Prometheus stored it
    query_b = query.replace(a, stack.target(stack.b))
    [nothing] = api(stack.prometheus, "query", query=query_b)["result"]
    assert float(nothing["value"][1]) == 0  # B freed nothing: the series exists, at 0
    tenants = api(stack.prometheus, "query", query="vram_supervisor_container_vram_bytes")
    by_role = {
        (s["metric"]["instance"], s["metric"]["role"]): float(s["value"][1])
        for s in tenants["result"]
    }
    assert by_role[(stack.target(stack.a), "ollama")] > 0
    print(f"\nquery {query}:\n{json.dumps(freed)}")
    print(f"{len(series)} vram_supervisor_ series, {len(names)} names")


def test_every_rule_evaluates_and_only_the_deserved_alert_is_active(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = api(stack.prometheus, "rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
        pending = any(r["name"] == "VramDockerEventsDisconnected" and r["alerts"] for r in rules)
        return rules if done and pending else None

    rules = wait_until("every rule evaluated with data", evaluated)
    assert {rule["name"] for rule in rules} == ALERTS
    assert all(rule["health"] == "ok" for rule in rules), rules
    active = [
        (alert["labels"]["alertname"], alert["labels"].get("instance"), alert["state"])
        for alert in api(stack.prometheus, "alerts")["alerts"]
    ]
    # B has no Docker: its events stream is down (firing after `for: 2m`, so pending now).
    assert active == [("VramDockerEventsDisconnected", stack.target(stack.b), "pending")]


def test_alerts_fire_when_they_should(stack: Stack, tmp_path: Path) -> None:
    """promtool's rule unit tests, on the rules as Prometheus loaded them."""
    promtool = tool("promtool")
    groups = api(stack.prometheus, "rules")["groups"]
    stripped = {
        "groups": [
            {
                "name": group["name"],
                "rules": [
                    {
                        "alert": rule["name"],
                        "expr": rule["query"],
                        "for": f"{int(rule['duration'])}s",
                        "labels": rule["labels"],
                    }
                    for rule in group["rules"]
                ],
            }
            for group in groups
        ]
    }
    (tmp_path / "alerts.json").write_text(json.dumps(stripped))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / RULE_TESTS.name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Each alert is tested both firing and not (yet) firing.
    spec = RULE_TESTS.read_text()
    for alert in ALERTS:
        assert spec.count(f"alertname: {alert}") >= 2, alert


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_metric_used_exists(stack: Stack) -> None:
    exported = exported_names(stack.metrics_a) | exported_names(stack.metrics_b)
    rules = [
        (rule["name"], rule["query"])
        for group in api(stack.prometheus, "rules")["groups"]
        for rule in group["rules"]
    ]
    used: dict[str, set[str]] = {}
    for where, expr in [*dashboard_targets(), *rules]:
        names = metric_names(expr)
        assert names, f"no metric found in {where}: {expr}"
        for name in names:
            used.setdefault(name, set()).add(where)
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and name not in PROMETHEUS_OWN
    }
    assert not missing, f"used but not exported: {missing}"
    # What the dashboard and the alerts are about is all there.
    assert {
        "vram_supervisor_container_vram_bytes",
        "vram_supervisor_ollama_model_gpu_ratio",
        "vram_supervisor_frees_total",
        "vram_supervisor_heals_total",
        "vram_supervisor_restarts_total",
        "vram_supervisor_gate_waits_total",
        "vram_supervisor_gate_wait_seconds_total",
        "vram_supervisor_docker_events_connected",
        "vram_supervisor_last_pass_timestamp_seconds",
    } <= set(used)


def test_every_dashboard_query_runs(stack: Stack) -> None:
    grafana = {"$__rate_interval": "10s", "$__range": "1m", "$__interval": "5s"}
    results: dict[str, int] = {}
    for title, expr in dashboard_targets():
        query = expr.replace('"$instance"', '".*"')
        for variable, value in grafana.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"{title}: unknown variable in {expr}"
        data = api(stack.prometheus, "query", query=query)
        results[expr] = len(data["result"])
    by_tenant = 'vram_supervisor_container_vram_bytes{instance=~"$instance"}'
    assert results[by_tenant] >= 2, results  # A's Ollama and ComfyUI (and B's Ollama)


def test_the_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "vram-supervisor" and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    titles = " | ".join(panel["title"] for panel in panels)
    for topic in ("VRAM by tenant", "Frees by stage and result", "Heals", "Gate wait duration"):
        assert topic in titles
