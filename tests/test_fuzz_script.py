"""benchmarks/fuzz_server.py's pure parts: the loopback guard, the envelope and stream checks, the
bounds and the targets. No server is started."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "fuzz_server.py"
spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
fuzz = sys.modules["fuzz_server"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(fuzz)

ENVELOPE = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.9.9", "http://localhost:1",
                                 "http://[::1]:8000/"])
def test_loopback_urls_are_accepted(url):
    assert fuzz.loopback_problem(url) is None


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://127.0.0.1.example.com", "https://127.0.0.1", "ftp://127.0.0.1",
                                 "127.0.0.1:8000"])
def test_other_hosts_and_schemes_are_refused(url):
    assert fuzz.loopback_problem(url) is not None


def test_main_refuses_a_remote_server_before_sending_anything(capsys):
    assert fuzz.main(["--base-url", "http://192.0.2.1:8000"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_envelope_needs_all_four_fields():
    assert fuzz.envelope_problem(json.dumps(ENVELOPE).encode()) is None
    no_code = {"error": {k: v for k, v in ENVELOPE["error"].items() if k != "code"}}
    assert "code" in fuzz.envelope_problem(json.dumps(no_code).encode())
    assert fuzz.envelope_problem(b'{"detail": "Not Found"}') is not None  # FastAPI's default
    assert fuzz.envelope_problem(b"Internal Server Error") == "body is not JSON"
    assert fuzz.envelope_problem(b'{"error": "x"}') is not None
    assert fuzz.envelope_problem(b"[]") is not None


def test_status_kinds():
    assert [fuzz.status_kind(s) for s in (200, 204, 400, 413, 503)] == \
        ["2xx", "2xx", "4xx:400", "4xx:413", "5xx:503"]


def test_encode_sends_raw_tokens_bare():
    body = fuzz.encode({"temperature": fuzz.NAN, "top_p": fuzz.OVERFLOW, "prompt": "NaN"})
    assert body == b'{"temperature": NaN, "top_p": 1e309, "prompt": "NaN"}'
    assert fuzz.encode(b"{") == b"{"


def sse(*events) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


GOOD_STREAM = sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b", "finish_reason": "length"}]},
                  {"choices": [], "usage": {"completion_tokens": 48}}, "[DONE]")


def test_a_complete_stream_is_no_bystander_failure():
    summary = fuzz.summarize_sse(GOOD_STREAM)
    assert summary == fuzz.StreamSummary(1, True, 0, 0, 48)
    assert fuzz.bystander_problem(200, summary, 48) is None


@pytest.mark.parametrize("text, status, reason", [
    (GOOD_STREAM.replace("data: [DONE]\n\n", ""), 200, "[DONE]"),
    (GOOD_STREAM.replace('"finish_reason": "length"', '"finish_reason": null'), 200, "finish_reason"),
    (GOOD_STREAM.replace("48", "12"), 200, "12 completion tokens"),
    (sse({"choices": [{"text": "a"}]}, {"error": {"message": "engine failed"}}, "[DONE]"), 200, "error"),
    (GOOD_STREAM, 500, "HTTP 500"),
])
def test_bystander_failures_say_why(text, status, reason):
    problem = fuzz.bystander_problem(status, fuzz.summarize_sse(text), 48)
    assert problem is not None and reason in problem, problem


def test_metric_value_reads_one_series():
    text = ('# HELP vattention:kv_cache_bytes KV\nvattention:kv_cache_bytes{state="used"} 4096.0\n'
            'vattention:kv_cache_bytes{state="committed"} 8192.0\nvattention:num_requests_running 0.0\n')
    assert fuzz.metric_value(text, fuzz.KV_USED) == 4096.0
    assert fuzz.metric_value(text, fuzz.RUNNING) == 0.0
    assert fuzz.metric_value(text, fuzz.RSS_METRIC) is None


def test_vm_rss_of_this_process():
    assert fuzz.vm_rss_bytes(os.getpid()) > 1 << 20
    assert fuzz.vm_rss_bytes(2**22 + 12345) is None


def test_budget_stops_at_the_request_count_and_the_deadline():
    budget = fuzz.Budget(max_requests=2, deadline=float("inf"))
    assert [budget.take() for _ in range(3)] == [True, True, False]
    assert not fuzz.Budget(max_requests=10, deadline=0.0).take()


def test_tally_counts_5xx_envelopes_and_stream_errors():
    t = fuzz.Tally()
    t.record("/x", "a", 400, json.dumps(ENVELOPE).encode(), "application/json", True)
    t.record("/x", "b", 500, b"Internal Server Error", "text/plain", True)
    t.record("/x", "c", 200, sse({"error": {"message": "m"}}, "[DONE]").encode(), "text/event-stream", None)
    t.record("/x", "d", 200, b"{}", "application/json", True)
    assert t.kinds == {"4xx:400": 1, "5xx:500": 1, "2xx": 2}
    assert (t.server_errors, t.envelope_violations, t.stream_errors, t.accepted_bad) == (1, 1, 1, 1)


def clean_report() -> fuzz.Report:
    r = fuzz.Report("http://127.0.0.1:8000", 1, 0, {"request_timeout_s": 60.0})
    r.phases["fuzz"] = fuzz.Tally(requests=3, kinds={"2xx": 1, "4xx:400": 2})
    r.bystanders, r.health_end_status, r.kv_used_end_bytes, r.rss_ratio = 8, 200, 0.0, 1.02
    r.big = [fuzz.BigResult("p", 10, 413, 0.1, True, 0.05, 5, 0, None)]
    r.huge_n = [fuzz.HugeNResult("n", 400, 0.01, 200)]
    r.slow = [fuzz.SlowResult("silent", 5.0, None)]
    return r


def test_a_clean_run_meets_every_target():
    r = clean_report()
    assert all(t.ok for t in fuzz.targets(r)), [t for t in fuzz.targets(r) if not t.ok]


@pytest.mark.parametrize("spoil", [
    lambda r: r.phases["fuzz"].kinds.update({"5xx:500": 1}),
    lambda r: setattr(r, "bystander_failures", 1),
    lambda r: setattr(r, "big", [fuzz.BigResult("p", 10, 400, 3.0, False, 1.5, 5, 0, None)]),
    lambda r: setattr(r, "big", [fuzz.BigResult("p", 10, 400, 0.1, False, 0.05, 5, 1, None)]),
    lambda r: setattr(r, "rss_ratio", 1.2),
    lambda r: setattr(r, "kv_used_end_bytes", 4096.0),
    lambda r: setattr(r, "slow", [fuzz.SlowResult("silent", None, None)]),
    lambda r: setattr(r, "huge_n", [fuzz.HugeNResult("n", None, 60.0, 503)]),
    lambda r: setattr(r, "health_end_status", 503),
])
def test_each_missed_target_fails_the_run(spoil):
    r = clean_report()
    spoil(r)
    assert [t.name for t in fuzz.targets(r) if t.ok is False], "a missed target went unnoticed"


def test_unmeasured_targets_are_not_passed_or_failed():
    r = fuzz.Report("http://127.0.0.1:8000", None, 0, {"request_timeout_s": 60.0})
    r.health_end_status = 200
    unmeasured = {t.name for t in fuzz.targets(r) if t.ok is None}
    assert any("RSS" in n for n in unmeasured) and any("bystander" in n for n in unmeasured)


def test_fuzz_cases_encode_and_random_ones_follow_the_seed():
    cases = fuzz.completion_cases() + fuzz.chat_cases() + fuzz.tokenizer_cases()
    assert len(cases) > 150
    for case in cases:
        assert isinstance(fuzz.encode(case.body), bytes)
    names = lambda seed: [c.name for c in fuzz.random_cases(random.Random(seed), 30)]  # noqa: E731
    assert names(1) == names(1) != names(2)
    for _, _, body in fuzz.poison_bodies():
        assert "max_tokens" in body
