"""`GET /metrics` and the per-request log line, against a real daemon."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with daemon.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests_tokens_and_latency(tiny_daemon: Daemon) -> None:
    before = scrape(tiny_daemon)
    client = tiny_daemon.client()
    with client.messages.stream(
        model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Count metrics."}]
    ) as stream:
        message = stream.get_final_message()
    after = scrape(tiny_daemon)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("pensieve_requests_total", route="/v1/messages", status="200") == 1
    assert grew("pensieve_tokens_total", kind="output") == message.usage.output_tokens
    assert grew("pensieve_tokens_total", kind="input") == message.usage.input_tokens
    assert grew("pensieve_tokens_total", kind="cached") == message.usage.cache_read_input_tokens
    assert grew("pensieve_time_to_first_token_seconds_count") == 1
    assert grew("pensieve_decode_tokens_per_second_count") == 1
    for gauge in (
        "pensieve_queue_depth",
        "pensieve_inflight_sequences",
        "pensieve_prompt_cache_bytes",
        "pensieve_prompt_cache_budget_bytes",
    ):
        assert (gauge, ()) in after
    assert after[("pensieve_prompt_cache_bytes", ())] > 0  # the message left its cache
    # A refused request is counted under its status too.
    with tiny_daemon.http() as http:
        assert http.post("/v1/messages", json={"model": "tiny"}).status_code == 400
    assert (
        scrape(tiny_daemon)[
            ("pensieve_requests_total", (("route", "/v1/messages"), ("status", "400")))
        ]
        >= 1
    )


def test_each_message_logs_its_tokens_cache_ttft_and_rate(tiny_daemon: Daemon) -> None:
    body = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "Log it."}]}
    with tiny_daemon.http() as http:
        response = http.post("/v1/messages", json=body)
    usage = response.json()["usage"]
    request_id = response.headers["request-id"]
    line = re.search(
        rf"{request_id} done: \w+ in=(\d+) cached=(\d+) out=(\d+) ttft=\d+ms rate=[\d.]+tok/s",
        tiny_daemon.log(),
    )
    assert line is not None
    figures = [int(group) for group in line.groups()]
    assert figures == [
        usage["input_tokens"],
        usage["cache_read_input_tokens"],
        usage["output_tokens"],
    ]


def test_metrics_and_the_full_health_report_need_the_token(tiny_daemon: Daemon) -> None:
    """They tell who does what (paths, requests, tok/s): not for every local user."""
    with tiny_daemon.http() as http:
        assert http.get("/metrics", headers={"x-api-key": ""}).status_code == 401
        assert http.get("/metrics", headers={"x-api-key": "wrong"}).status_code == 401
        brief = http.get("/health", headers={"x-api-key": ""})
        wrong = http.get("/health", headers={"x-api-key": "wrong"})
        full = http.get("/health").json()
    # Without the token, /health says whether the daemon is up, and nothing more.
    assert brief.status_code == wrong.status_code == 200
    assert brief.json() == wrong.json() == {"status": "ok"}
    assert full["status"] == "ok" and "models" in full and "pid" in full
