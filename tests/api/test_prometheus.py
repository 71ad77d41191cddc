"""A real Prometheus server (Debian's `prometheus`, started here on loopback) scrapes the app's /metrics with the
API key, as docs/operating.md configures it, and its query API answers the operator's questions."""

import json
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from dsvl_app.settings import parse_settings
from tests.conftest import free_port, serve, wait_until

pytestmark = pytest.mark.api

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
KEY = "sk-prometheus-scrape-01"
MODEL = "tiny-dsvl-hybrid"
# The five queries of docs/operating.md, as written there.
QUERIES = {
    "p95 time to first token": 'histogram_quantile(0.95, sum by (le) (rate(dsvl_time_to_first_token_seconds_bucket[1m])))',
    "tokens per second": "sum(rate(dsvl_generation_tokens_total[1m]))",
    "queue length": "sum(dsvl_num_requests_waiting)",
    "refusal rate": "sum by (reason) (rate(dsvl_requests_refused_total[1m]))",
    "budget use": "max(dsvl_kv_cache_usage_perc)",
}


def config(target: str, credentials: Path) -> str:
    """The scrape config of docs/operating.md, with a 1 s interval for the test."""
    return f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: dsvl-chat
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials_file: {credentials}
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture(scope="module")
def prometheus(handle, tmp_path_factory):
    if not Path(PROMETHEUS).exists():
        pytest.skip("Debian's prometheus package is not installed (scripts/setup.sh dev installs it; apt-get install "
                    "prometheus failed or is not allowed on this machine)")
    folder = tmp_path_factory.mktemp("prometheus")
    settings = parse_settings(["--model", "tiny", "--api-key", KEY], environ={})
    with serve(settings, handle) as served:
        app = urlparse(served[1])
        (folder / "key").write_text(KEY)
        (folder / "prometheus.yml").write_text(config(app.netloc, folder / "key"))
        port = free_port()
        server = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"))
        api = f"http://127.0.0.1:{port}/api/v1/"
        try:
            assert wait_until(lambda: _ready(api), timeout=60), (folder / "prometheus.log").read_text()[-2000:]
            yield served[1], api
        finally:
            server.terminate()
            server.wait(10)


def _ready(api: str) -> bool:
    try:
        return httpx.get(api.removesuffix("api/v1/") + "-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(api: str, expr: str) -> list[dict]:
    response = httpx.get(api + "query", params={"query": expr}, timeout=10).json()
    assert response["status"] == "success", response
    return response["data"]["result"]


def test_prometheus_scrapes_the_app_with_the_key_and_answers_the_operators_queries(prometheus):
    url, api = prometheus
    client = openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0, timeout=120)
    replies = 3
    for i in range(replies):
        client.chat.completions.create(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": f"Hi {i}"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=7)

    def scraped() -> bool:
        result = query(api, "dsvl_time_to_first_token_seconds_count")
        return bool(result) and float(result[0]["value"][1]) >= replies

    assert wait_until(scraped, timeout=60, poll=0.5), query(api, "up")
    up = query(api, 'up{job="dsvl-chat"}')
    assert [float(r["value"][1]) for r in up] == [1.0]  # scraped with the key (a 401 would be up == 0)
    count = query(api, "dsvl_time_to_first_token_seconds_count")
    assert float(count[0]["value"][1]) == replies
    refused = query(api, 'dsvl_requests_refused_total{reason="bad_parameter",surface="v1"}')
    assert float(refused[0]["value"][1]) == 1
    time.sleep(2.5)  # two more scrapes: rate() needs two points
    for name, expr in QUERIES.items():
        result = query(api, expr)
        assert result, f"{name}: {expr} returned nothing"
    waiting = query(api, QUERIES["queue length"])
    assert float(waiting[0]["value"][1]) == 0
    docs = Path(__file__).resolve().parents[2] / "docs"
    for expr in QUERIES.values():
        assert expr in (docs / "operating.md").read_text()  # the queries tested are the ones documented
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert set(QUERIES.values()) <= set(exprs)
    for expr in exprs:  # every panel's query is valid PromQL over series that exist
        assert query(api, expr), expr
