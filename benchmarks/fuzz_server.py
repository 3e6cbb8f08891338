"""Fuzz and soak a running `vattention serve` over loopback, bounded in requests and time (issue #11).

    python benchmarks/fuzz_server.py --base-url http://127.0.0.1:8000 --pid PID \
        --max-requests 2000 --duration-s 300 --out benchmarks/results/fuzz_server.json

Phases, in order; each stops starting requests once --max-requests or --duration-s is spent:
  1 fuzz        malformed JSON, wrong types, out-of-range values and unknown fields on
                /v1/completions, /v1/chat/completions, /tokenize and /detokenize, then seeded
                random mutations of valid bodies. Every non-2xx must carry the OpenAI envelope
                {"error": {"message", "type", "param", "code"}}.
  2 poison      K greedy streaming bystanders of 48 tokens while requests that pass validation but
                are numerically extreme (top_p 1e-50, repetition_penalty 1e-40 / 1e40,
                temperature 1e-6 / 1e30, ...) join their batch. A bystander fails unless its stream
                ends with a finish_reason, 48 completion tokens in its usage chunk and [DONE], with
                no error event in between. Then each poison request alone, so a failure names its
                input.
  3 large       --big-mb prompts (text, token ids, a chat message, /tokenize) over raw sockets
                while /health is polled every 100 ms; then n=10000 and a normal request after it.
  4 disconnect  raw sockets dropping mid-body, mid-stream and mid non-streaming request (half
                closed, half reset); then half-sent requests held open to see when the server
                closes them (bounded by --slow-timeout-s).
  5 soak        (--soak-s > 0) mixed valid requests, some abandoned by the client at random.

Figures (printed as tables, written as JSON to --out): requests and status kinds (2xx,
4xx:<code>, 5xx:<code>) per phase and endpoint, hangs (no answer in --request-timeout-s), requests
the server dropped without a response, error events inside 200 streams, envelope violations,
bystander failures, the slowest /health during a maximal request, the server's RSS at the start
(after a warm-up), at its peak and at the end, and its KV bytes in use at the end. Exit status 1
if a target in the table is missed, 2 if the server cannot be fuzzed (not loopback, not up).

A phase after which /health is not 200 (the server died, or its engine failed) ends the run: later
phases would only measure the failure. `--phases large,disconnect` runs some of them alone, against
a fresh server. On a shared machine, `--kill-server-over-rss-gib` SIGKILLs --pid before a request
that grows without bound takes the machine's memory (a server before issue #11's fixes does).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TOKENIZE, DETOKENIZE = "/tokenize", "/detokenize"
JSON_TYPE = "application/json"
BYSTANDER_TOKENS = 48  # each bystander's max_tokens, with ignore_eos: it must get all of them
MAX_EXAMPLES = 40  # failure lines kept per phase, so the JSON stays readable
SEND_CHUNK_BYTES = 1 << 20  # raw-socket bodies go out in pieces, so an early answer is seen
RAW_TOKEN = re.compile(r'"@@(.*?)@@"')  # "@@NaN@@" in a body object goes out as the bare token NaN
KV_USED = 'vattention:kv_cache_bytes{state="used"}'
RUNNING = "vattention:num_requests_running"
WAITING = "vattention:num_requests_waiting"
RSS_METRIC = "process_resident_memory_bytes"
PHASES = ("fuzz", "poison", "large", "disconnect", "soak")

NAN, INF, NEG_INF, OVERFLOW = "@@NaN@@", "@@Infinity@@", "@@-Infinity@@", "@@1e309@@"
USER = [{"role": "user", "content": "hi"}]


# ---- pure checks (tests/test_fuzz_script.py) -----------------------------------------------------


def loopback_problem(base_url: str) -> str | None:
    """Why base_url may not be fuzzed (not plain http, or not a loopback host), else None."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        return f"--base-url must be http:// (raw sockets are used), got {base_url!r}"
    host = parts.hostname
    if host == "localhost":
        return None
    try:
        if host is not None and ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return f"refusing to fuzz {host!r}: only loopback hosts (127.0.0.0/8, ::1, localhost)"


def envelope_problem(body: bytes) -> str | None:
    """What keeps body from being the OpenAI error envelope, else None."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "body is not JSON"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return 'no "error" object'
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        return "error lacks " + ", ".join(missing)
    if not (isinstance(error["message"], str) and isinstance(error["type"], str)):
        return "error.message or error.type is not a string"
    return None


def status_kind(status: int) -> str:
    """2xx, or the class and code: 4xx:400, 5xx:503."""
    return "2xx" if 200 <= status < 300 else f"{status // 100}xx:{status}"


def encode(body: object) -> bytes:
    """A request body: bytes as they are, else JSON with "@@TOKEN@@" strings sent as bare TOKEN."""
    if isinstance(body, bytes):
        return body
    return RAW_TOKEN.sub(r"\1", json.dumps(body)).encode()


@dataclass
class StreamSummary:
    """What a server-sent-event body held."""

    finish_reasons: int  # chunks carrying a finish_reason (one per finished choice)
    done: bool  # the last event was [DONE]
    error_events: int  # data: {"error": ...}, a failure the 200 status hides
    malformed_events: int  # data lines that are not a JSON object
    completion_tokens: int | None  # from the usage chunk, if one came


def summarize_sse(text: str) -> StreamSummary:
    finishes = errors = malformed = 0
    done, tokens = False, None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        done = data == "[DONE]"
        if done:
            continue
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            malformed += 1
        elif "error" in event:
            errors += 1
        else:
            finishes += sum(1 for c in event.get("choices") or [] if c.get("finish_reason"))
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    return StreamSummary(finishes, done, errors, malformed, tokens)


def bystander_problem(status: int | None, summary: StreamSummary | None, want_tokens: int) -> str | None:
    """Why a bystander's stream failed, else None."""
    if status != 200 or summary is None:
        return f"HTTP {status}"
    if summary.error_events or summary.malformed_events:
        return f"{summary.error_events} error and {summary.malformed_events} malformed events"
    if not summary.finish_reasons:
        return "no finish_reason"
    if not summary.done:
        return "no [DONE]"
    if summary.completion_tokens is None or summary.completion_tokens < want_tokens:
        return f"{summary.completion_tokens} completion tokens, wanted {want_tokens}"
    return None


def metric_value(text: str, series: str) -> float | None:
    """The value of one Prometheus series (name plus labels exactly as exposed), else None."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def vm_rss_bytes(pid: int) -> int | None:
    """The process's resident set from /proc/PID/status, else None (gone, or not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


# ---- what a run records --------------------------------------------------------------------------


@dataclass
class Budget:
    """The run's bounds: no request starts past either (one already running ends by its timeout)."""

    max_requests: int
    deadline: float  # time.monotonic() after which nothing new starts
    used: int = 0

    def take(self) -> bool:
        if self.used >= self.max_requests or time.monotonic() >= self.deadline:
            return False
        self.used += 1
        return True


@dataclass
class Tally:
    """What one phase saw."""

    requests: int = 0  # requests (or raw connections) started
    kinds: dict[str, int] = field(default_factory=dict)  # 2xx, 4xx:400, 5xx:500, hang, no_response, ...
    by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> kind -> count
    hangs: int = 0  # no answer within --request-timeout-s
    no_response: int = 0  # the server closed or reset the connection without answering
    stream_errors: int = 0  # error or malformed events inside a 200 stream
    envelope_violations: int = 0  # non-2xx without the OpenAI error envelope
    accepted_bad: int = 0  # inputs meant to be refused that got a 2xx (worth a look, not a target)
    examples: list[str] = field(default_factory=list)  # the first failures and oddities
    truncated: bool = False  # the budget ran out before the phase sent everything
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind.startswith("5xx"))

    def count(self, endpoint: str, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        per = self.by_endpoint.setdefault(endpoint, {})
        per[kind] = per.get(kind, 0) + 1
        self.hangs += kind == "hang"
        self.no_response += kind == "no_response"

    def note(self, line: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(" ".join(line.split())[:300])

    def record(self, endpoint: str, name: str, status: int, body: bytes, content_type: str,
               expect_reject: bool | None) -> None:
        """One answered request; expect_reject None = either answer is fine."""
        self.count(endpoint, status_kind(status))
        snippet = body[:160].decode(errors="replace")
        if status >= 500:
            self.note(f"{status} {endpoint} {name}: {snippet}")
        if status >= 400 and (problem := envelope_problem(body)) is not None:
            self.envelope_violations += 1
            self.note(f"envelope ({problem}) {status} {endpoint} {name}: {snippet}")
        if 200 <= status < 300 and "text/event-stream" in content_type:
            summary = summarize_sse(body.decode(errors="replace"))
            if summary.error_events or summary.malformed_events:
                self.stream_errors += 1
                self.note(f"stream error {endpoint} {name}: {snippet}")
        if 200 <= status < 300 and expect_reject:
            self.accepted_bad += 1
            self.note(f"accepted {endpoint} {name}")


@dataclass
class BigResult:
    """One maximal request, with /health polled while it was in flight."""

    name: str
    body_bytes: int
    status: int | None  # None: no answer
    seconds: float  # until the answer or the give-up
    answered_before_sent: bool  # refused before the whole body went out (what a size limit does)
    max_health_latency_s: float
    health_polls: int
    health_failures: int  # polls not answered 200 within the timeout
    error: str | None  # why there was no answer


@dataclass
class SlowResult:
    """One half-sent request held open."""

    kind: str  # partial_body, partial_headers, silent
    closed_after_s: float | None  # when the server closed it; None = still open at the bound
    answered: int | None  # the status it sent before closing (408, 400, ...), if any
    error: str | None = None  # it could not be opened at all


@dataclass
class PoisonResult:
    """One poison request sent alone, after the bystander round: which input breaks what."""

    name: str
    status: int | None  # None: no answer
    stream_error: bool  # a 200 stream carrying an error event


@dataclass
class HugeNResult:
    """A request for very many samples, and a normal request sent right after it."""

    name: str
    status: int | None  # None: no answer (a hang or a dropped connection)
    seconds: float
    after_status: int | None  # the normal request's: 503 means the huge one still holds the queue


@dataclass
class Target:
    name: str
    value: float | None  # None: not measured (phase skipped, no RSS source)
    limit: str
    ok: bool | None  # None: not measured


@dataclass
class Report:
    base_url: str
    pid: int | None
    seed: int
    budget: dict[str, float]  # the bounds the run had
    phases: dict[str, Tally] = field(default_factory=dict)
    bystanders: int = 0
    bystander_failures: int = 0
    bystander_problems: list[str] = field(default_factory=list)
    poison_requests: int = 0
    poison_alone: list[PoisonResult] = field(default_factory=list)
    big: list[BigResult] = field(default_factory=list)
    huge_n: list[HugeNResult] = field(default_factory=list)
    abort_settle_s: float | None = None  # after the disconnects, until nothing runs and no KV is used
    slow: list[SlowResult] = field(default_factory=list)
    slow_timeout_s: float = 0.0
    health_during_slow_s: float | None = None  # a /health answer while they are held open
    health_during_slow_status: int | None = None
    normal_during_slow_status: int | None = None  # a small completion while they are held open
    rss_source: str = "none"  # /proc/PID/status, /metrics, or none
    rss_start_bytes: int | None = None  # after the warm-up requests
    rss_end_bytes: int | None = None
    rss_peak_bytes: int | None = None  # sampled every 0.2 s (with --pid)
    rss_after_big_bytes: int | None = None  # after the maximal requests, before the huge n ones
    killed_over_rss_bytes: int | None = None  # --kill-server-over-rss-gib fired at this RSS
    server_lost_in: str | None = None  # the phase after which the server no longer answered
    rss_ratio: float | None = None
    kv_used_end_bytes: float | None = None
    health_end_status: int | None = None
    seconds: float = 0.0
    targets: list[Target] = field(default_factory=list)
    ok: bool = False

    @property
    def max_health_latency_s(self) -> float | None:
        return max((b.max_health_latency_s for b in self.big if b.health_polls), default=None)

    @property
    def failed_health_polls(self) -> int:
        return sum(b.health_failures for b in self.big)

    @property
    def slow_left_open(self) -> int | None:
        opened = [s for s in self.slow if s.error is None]
        return sum(s.closed_after_s is None for s in opened) if opened else None


# ---- fuzz cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    path: str
    body: object  # bytes as sent, or an object encode() turns into JSON
    expect_reject: bool | None = True  # None: valid either way (controls, random mutations)
    method: str = "POST"
    content_type: str = JSON_TYPE


MALFORMED = [b"", b"{", b"not json", b"[]", b"null", b'"str"', b'{"prompt": }', b"\xff\xfe\x00",
             b'{"prompt":"x"}{"prompt":"y"}', b'{"prompt":"\\ud800","max_tokens":2}',
             b"[" * 100_000 + b"]" * 100_000]


def field_cases(path: str, base: dict, variants: dict[str, list]) -> list[Case]:
    """base with one field set to each bad value in turn."""
    return [Case(f"{key}={encode(value).decode()[:40]}", path, {**base, key: value})
            for key, values in variants.items() for value in values]


def completion_cases() -> list[Case]:
    base = {"prompt": "x", "max_tokens": 2}
    bad = {
        "prompt": [123, {"a": 1}, [1, "a"], [[1], ["x"]], True, None, "", [], [[]], [""], [[1], []],
                   ["x"] * 257, [10**9], [-1], [2**63], [2**64], [1.5], [[10**9]]],
        "max_tokens": [0, -1, 10**12, 2**64, "16", 1.5],
        "temperature": [-1, "hot", INF, NEG_INF, NAN, OVERFLOW, "Infinity", "NaN"],
        "top_p": [0, 2, -0.5, NAN, OVERFLOW],
        "top_k": [-2, 1.5, "five"],
        "min_p": [-1, 2, NAN],
        "repetition_penalty": [0, -1, NAN, INF],
        "presence_penalty": [3, OVERFLOW, NAN],
        "frequency_penalty": [-3, NAN],
        "n": [0, -1, "2", 2.5],  # huge n is phase 3's, each followed by a probe
        "seed": [2**64, -2**63 - 1, "abc", 1.5],
        "logit_bias": [[], "x", {"abc": 1}, {"1": "x"}, {"1": 1e9}, {"1": -101}, {"-1": 5},
                       {"99999999": 1}, {"1e3": 1}, {"\uff11": 1}, {"1": NAN}, {"1": INF},
                       {"9" * 30: 1}, {str(i): 1 for i in range(60_000)}],
        "stop": [5, [5], [""], {"a": 1}],
        "stop_token_ids": [[-1], [10**10], "x"],
        "stream": ["yes", "maybe", 2],
        "stream_options": [{"include_usage": True}, {"bogus": 1}, "x"],
        "logprobs": [-1, 21, 10**9, "5"],
        "echo": ["x", [1]],
        "model": ["nope", 5],
        "user": [5],
    }
    cases = field_cases(COMPLETIONS, base, bad)
    for name in ["foo", "functions", "best_of", "suffix"]:
        cases.append(Case(f"unknown field {name}", COMPLETIONS, {**base, name: 1}))
    cases += [Case("top_p=1e-50 greedy", COMPLETIONS, {**base, "top_p": 1e-50}, None),
              Case("seed=2**64-1", COMPLETIONS, {**base, "seed": 2**64 - 1}, None),
              Case("seed=-1", COMPLETIONS, {**base, "seed": -1}, None),
              Case("max_tokens=huge, long prompt", COMPLETIONS, {"prompt": "x " * 4000, "max_tokens": 10**6}),
              Case("echo with logprobs", COMPLETIONS, {**base, "echo": True, "logprobs": 2}),
              Case("stream_options, no stream", COMPLETIONS,
                   {**base, "stream_options": {"include_usage": True}}),
              Case("stop x 1000", COMPLETIONS, {**base, "stop": ["x"] * 1000}, None),
              Case("stop 100k chars", COMPLETIONS, {**base, "stop": "x" * 100_000}, None),
              Case("NUL in prompt", COMPLETIONS, {**base, "prompt": "a\u0000b"}, None),
              Case("duplicate key", COMPLETIONS, b'{"prompt":"x","prompt":5,"max_tokens":2}'),
              Case("valid", COMPLETIONS, base, False),
              Case("valid stream", COMPLETIONS, {**base, "stream": True}, False),
              Case("text/plain body", COMPLETIONS, base, False, content_type="text/plain"),
              Case("GET", COMPLETIONS, b"", method="GET"),
              Case("unknown route", "/v1/nope", base),
              Case("DELETE /health", "/health", b"", method="DELETE")]
    return cases


def chat_cases() -> list[Case]:
    base = {"messages": USER, "max_tokens": 2}
    text_part = {"type": "text", "text": "hi"}
    messages = ["hi", [], [{"content": "x"}], [{"role": "wizard", "content": "x"}],
                [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
                [{"role": "user", "content": [{"type": "text"}]}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                [{"role": "user", "content": [{"foo": 1}]}], [{"role": "user", "content": [text_part, 7]}],
                [{"role": "user", "content": None}], [{"role": "user"}], [None], [[]],
                [{"role": "user", "content": "x", "name": {"a": [1]}}],
                [{"role": "user", "content": "x", "tool_calls": [{"bad": 1}]}]]
    bad = {"messages": messages,
           "max_tokens": [0, -1], "max_completion_tokens": [-1, 10**12],
           "top_logprobs": [21, 1000], "logprobs": ["yes please"],
           "temperature": [NAN, OVERFLOW, -1], "n": [0], "logit_bias": [{"abc": 1}, {"-5": 1}],
           "stream": ["yes"], "tools": [[{"type": "function"}]], "response_format": [{"type": "json_object"}],
           "model": ["nope"]}
    cases = field_cases(CHAT, base, bad)
    def one(role: str, content: object) -> dict:
        return {**base, "messages": [{"role": role, "content": content}]}

    cases += [Case("top_logprobs without logprobs", CHAT, {**base, "top_logprobs": 5}),
              Case("only a system message", CHAT, one("system", "x"), None),
              Case("tool role", CHAT, one("tool", "x"), None),
              Case("template syntax in content", CHAT,
                   one("user", "{{ raise_exception('x') }}{% for %}"), None),
              Case("10000 messages", CHAT, {**base, "messages": USER * 10_000}),
              Case("valid", CHAT, base, False),
              Case("valid parts", CHAT, one("user", [text_part]), False)]
    return cases


def tokenizer_cases() -> list[Case]:
    tok = [({}, True), ({"prompt": "x", "messages": USER}, True), ({"prompt": 5}, True),
           ({"prompt": ["x"]}, True), ({"messages": [{"role": "wizard", "content": "x"}]}, None),
           ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, True),
           ({"prompt": "x", "model": "nope"}, True), ({"prompt": "x", "add_special_tokens": "maybe"}, True),
           ({"messages": []}, None), ({"prompt": "x", "foo": 1}, True), ({"prompt": ""}, None),
           ({"prompt": "hello"}, False), ({"messages": USER}, False)]
    detok = [({}, True), ({"tokens": [-1]}, True), ({"tokens": [10**9]}, True), ({"tokens": [2**64]}, True),
             ({"tokens": [1.5]}, True), ({"tokens": "abc"}, True), ({"tokens": [[1]]}, True),
             ({"tokens": [1], "foo": 1}, True), ({"tokens": []}, None), ({"tokens": [1, 2, 3]}, False)]
    return ([Case(json.dumps(b)[:60], TOKENIZE, b, r) for b, r in tok]
            + [Case(json.dumps(b)[:60], DETOKENIZE, b, r) for b, r in detok])


WEIRD_VALUES = [None, True, -1, 0, 2**64, -2**63, 1e308, 5e-324, "", "x" * 1000, [], {}, [None],
                {"a": None}, "NaN", NAN, INF, OVERFLOW, [[[]]], -0.0]
MUTABLE_FIELDS = {COMPLETIONS: ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed",
                                "logit_bias", "stop", "logprobs", "stream", "echo", "min_p"],
                  CHAT: ["messages", "max_tokens", "temperature", "n", "logprobs", "top_logprobs", "stream"],
                  TOKENIZE: ["prompt", "messages", "add_special_tokens"],
                  DETOKENIZE: ["tokens"]}
VALID_BASES = {COMPLETIONS: {"prompt": "x", "max_tokens": 2}, CHAT: {"messages": USER, "max_tokens": 2},
               TOKENIZE: {"prompt": "hello"}, DETOKENIZE: {"tokens": [1, 2]}}


def random_cases(rng: random.Random, count: int) -> list[Case]:
    """Seeded mutations of valid bodies: a field set to a weird value, a cut, a flipped byte."""
    cases = []
    for i in range(count):
        path = rng.choice(list(VALID_BASES))
        body = dict(VALID_BASES[path])
        how = rng.random()
        if how < 0.6:
            key, value = rng.choice(MUTABLE_FIELDS[path]), rng.choice(WEIRD_VALUES)
            body[key] = value
            name, sent = f"random {key}={json.dumps(value)[:30]}", body
        elif how < 0.8:
            raw = encode(body)
            cut = rng.randrange(len(raw))
            name, sent = f"random cut at {cut}", raw[:cut]
        else:
            raw = bytearray(encode(body))
            at = rng.randrange(len(raw))
            raw[at] = rng.randrange(256)
            name, sent = f"random byte {at}", bytes(raw)
        cases.append(Case(f"{name} #{i}", path, sent, None))
    return cases


def poison_bodies() -> list[tuple[str, str, dict]]:
    """(name, path, body): valid requests that were numerically dangerous in the sampler."""
    p = {"prompt": "x", "max_tokens": 4}
    hot = {**p, "temperature": 1}
    chat = {"messages": USER, "max_tokens": 4, "temperature": 1}
    return [("top_p 1e-50", COMPLETIONS, {**hot, "top_p": 1e-50}),
            ("top_p 5e-324", COMPLETIONS, {**hot, "top_p": 5e-324}),
            ("top_k 1, top_p 1e-50", COMPLETIONS, {**hot, "top_k": 1, "top_p": 1e-50}),
            ("repetition_penalty 1e-40", COMPLETIONS, {**hot, "repetition_penalty": 1e-40}),
            ("repetition_penalty 1e40", COMPLETIONS, {**hot, "repetition_penalty": 1e40}),
            ("repetition_penalty 1e40 greedy", COMPLETIONS,
             {**p, "temperature": 0, "repetition_penalty": 1e40}),
            ("temperature 1e-6", COMPLETIONS, {**p, "temperature": 1e-6}),
            ("temperature 1e-5", COMPLETIONS, {**p, "temperature": 1e-5}),
            ("temperature 1e-45", COMPLETIONS, {**p, "temperature": 1e-45}),
            ("temperature 1e30", COMPLETIONS, {**p, "temperature": 1e30}),
            ("temperature 1e308", COMPLETIONS, {**p, "temperature": 1e308}),
            ("min_p 1", COMPLETIONS, {**hot, "min_p": 1.0}),
            ("min_p 1, top_p 1e-50", COMPLETIONS, {**hot, "min_p": 1.0, "top_p": 1e-50}),
            ("penalties +-2", COMPLETIONS, {**hot, "presence_penalty": 2, "frequency_penalty": -2}),
            ("logit_bias all -100 but one", COMPLETIONS,
             {**hot, "logit_bias": {**{str(i): -100 for i in range(2000)}, "7": 100}}),
            ("temperature 1e-6 logprobs 20", COMPLETIONS, {**p, "temperature": 1e-6, "logprobs": 20}),
            ("temperature 1e30 logprobs 20", COMPLETIONS, {**p, "temperature": 1e30, "logprobs": 20}),
            ("top_p 1e-50 n 4 seed", COMPLETIONS, {**hot, "top_p": 1e-50, "n": 4, "seed": 2**63 - 1}),
            ("chat top_p 1e-50", CHAT, {**chat, "top_p": 1e-50}),
            ("chat repetition_penalty 1e-40", CHAT, {**chat, "repetition_penalty": 1e-40}),
            ("chat temperature 1e30 top_logprobs", CHAT,
             {**chat, "temperature": 1e30, "logprobs": True, "top_logprobs": 20}),
            ("stream top_p 1e-50", COMPLETIONS, {**hot, "top_p": 1e-50, "stream": True}),
            ("stream repetition_penalty 1e40", COMPLETIONS,
             {**hot, "repetition_penalty": 1e40, "stream": True}),
            ("stream chat temperature 1e-6", CHAT, {**chat, "temperature": 1e-6, "stream": True})]


# ---- raw HTTP over asyncio sockets ---------------------------------------------------------------


@dataclass
class RawOutcome:
    status: int | None
    body: bytes
    seconds: float
    answered_before_sent: bool
    error: str | None  # "hang", or why the connection gave no answer


def request_head(method: str, path: str, host: str, api_key: str | None, content_length: int | None,
                 extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Type: {JSON_TYPE}", "Connection: close"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response: by Content-Length, chunked, or to EOF."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", ""):
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size + 2)
            del body[-2:]
        return status, bytes(body)
    return status, await reader.read()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed client or a dropped network does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def raw_exchange(host: str, port: int, head: bytes, body: bytes, timeout_s: float) -> RawOutcome:
    """Send head + body in pieces while reading, so an answer that comes before the body ends (a
    size limit's 413) is seen rather than lost to a broken pipe."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as e:
        return RawOutcome(None, b"", time.monotonic() - start, False, f"connect: {e!r}")
    sent = asyncio.Event()

    async def send() -> None:
        writer.write(head)
        for i in range(0, len(body), SEND_CHUNK_BYTES):
            writer.write(body[i:i + SEND_CHUNK_BYTES])
            await writer.drain()
        sent.set()

    sender = asyncio.ensure_future(send())
    try:
        status, content = await asyncio.wait_for(read_response(reader), timeout_s)
        return RawOutcome(status, content, time.monotonic() - start, not sent.is_set(), None)
    except TimeoutError:
        return RawOutcome(None, b"", time.monotonic() - start, False, "hang")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        return RawOutcome(None, b"", time.monotonic() - start, False, repr(e)[:200])
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.transport.abort()


# ---- the fuzzer ----------------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        parts = urlsplit(args.base_url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.host_header = parts.netloc
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.timeout_s = args.request_timeout_s
        self.rng = random.Random(args.seed)
        self.budget = Budget(args.max_requests, time.monotonic() + args.duration_s)
        self.report = Report(args.base_url, args.pid, args.seed,
                             {"max_requests": args.max_requests, "duration_s": args.duration_s,
                              "request_timeout_s": args.request_timeout_s},
                             slow_timeout_s=args.slow_timeout_s)
        self.client = httpx.AsyncClient(base_url=args.base_url, headers=self.headers,
                                        timeout=httpx.Timeout(self.timeout_s),
                                        limits=httpx.Limits(max_connections=200))

    # -- requests --

    async def send(self, tally: Tally, case: Case, counted: bool = True) -> tuple[int, bytes] | None:
        """One request, recorded in tally; (status, body), or None if unanswered or over budget.
        counted=False: outside the budget (the warm-up)."""
        if counted and not self.budget.take():
            tally.truncated = True
            return None
        tally.requests += 1
        try:
            r = await asyncio.wait_for(self.client.request(
                case.method, case.path, content=encode(case.body),
                headers={"Content-Type": case.content_type}), self.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            tally.count(case.path, "hang")
            tally.note(f"hang {case.path} {case.name}")
            return None
        except httpx.HTTPError as e:
            tally.count(case.path, "no_response")
            tally.note(f"no response {case.path} {case.name}: {e!r}"[:300])
            return None
        tally.record(case.path, case.name, r.status_code, r.content, r.headers.get("content-type", ""),
                     case.expect_reject)
        return r.status_code, r.content

    async def stream(self, path: str, body: dict,
                     started: asyncio.Event | None = None) -> tuple[int | None, str]:
        """A streamed request read to its end: (status or None if the connection failed, text);
        started is set at its first event. Raises TimeoutError past the request timeout."""
        async def read() -> tuple[int, str]:
            async with self.client.stream("POST", path, json=body) as r:
                parts = []
                async for text in r.aiter_text():
                    parts.append(text)
                    if started is not None and "data:" in text:
                        started.set()
                return r.status_code, "".join(parts)
        try:
            return await asyncio.wait_for(read(), self.timeout_s)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError as e:
            return None, repr(e)
        finally:
            if started is not None:
                started.set()

    async def metrics(self) -> str | None:
        try:
            r = await self.client.get("/metrics")
            return r.text if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    async def rss_bytes(self) -> int | None:
        if self.args.pid is not None:
            self.report.rss_source = f"/proc/{self.args.pid}/status VmRSS"
            return vm_rss_bytes(self.args.pid)
        value = metric_value(await self.metrics() or "", RSS_METRIC)
        self.report.rss_source = f"/metrics {RSS_METRIC}" if value is not None else "none"
        return None if value is None else int(value)

    async def settle(self, bound_s: float) -> float | None:
        """Seconds until no request runs or waits and no KV byte is used, or None past bound_s."""
        start = time.monotonic()
        while time.monotonic() - start < bound_s:
            text = await self.metrics() or ""
            values = [metric_value(text, s) for s in (RUNNING, WAITING, KV_USED)]
            if all(v == 0 for v in values):
                return time.monotonic() - start
            await asyncio.sleep(0.2)
        return None

    async def health_status(self) -> int | None:
        try:
            return (await self.client.get("/health")).status_code
        except httpx.HTTPError:
            return None

    async def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.args.wait_ready_s
        while True:
            if await self.health_status() == 200:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)

    async def warm_up(self) -> None:
        """First requests allocate what every later one reuses; RSS is measured after them."""
        scratch = Tally()
        for case in [Case("warm", COMPLETIONS, VALID_BASES[COMPLETIONS], False),
                     Case("warm", CHAT, VALID_BASES[CHAT], False),
                     Case("warm", TOKENIZE, VALID_BASES[TOKENIZE], False),
                     Case("warm", COMPLETIONS, {**VALID_BASES[COMPLETIONS], "stream": True}, False)]:
            await self.send(scratch, case, counted=False)

    async def healthy(self) -> bool:
        return await self.health_status() == 200

    # -- phases --

    async def phase_fuzz(self, tally: Tally) -> None:
        cases = completion_cases() + chat_cases() + tokenizer_cases()
        cases += random_cases(self.rng, self.args.random_cases)
        for case in cases:
            answer = await self.send(tally, case)
            if answer is not None and answer[0] < 500:
                continue
            if tally.truncated or not await self.healthy():
                return  # run() reports the server lost
            if answer is None:  # a hang: let the server drain, so the next case is judged alone
                await self.settle(self.args.settle_s)

    async def phase_poison(self, tally: Tally) -> None:
        bystander = {"prompt": "Once upon a time", "max_tokens": BYSTANDER_TOKENS, "ignore_eos": True,
                     "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
        k = self.args.bystanders
        if not all(self.budget.take() for _ in range(k)):
            tally.truncated = True
            return
        tally.requests += k
        started = [asyncio.Event() for _ in range(k)]
        tasks = [asyncio.ensure_future(self.stream(COMPLETIONS, bystander, s)) for s in started]
        # the poison joins the bystanders' batch once each has its first token
        await asyncio.wait([asyncio.ensure_future(s.wait()) for s in started], timeout=self.timeout_s)
        poison = [Case(name, path, body, None) for _ in range(self.args.poison_rounds)
                  for name, path, body in poison_bodies()]
        await asyncio.gather(*(self.send(tally, case) for case in poison))
        self.report.poison_requests += len(poison)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        self.report.bystanders += k
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                hang = isinstance(outcome, TimeoutError)
                problem = "hang" if hang else repr(outcome)
                tally.count(COMPLETIONS, "hang" if hang else "no_response")
            else:
                status, text = outcome
                tally.count(COMPLETIONS, "no_response" if status is None else status_kind(status))
                problem = bystander_problem(status, summarize_sse(text) if status else None, BYSTANDER_TOKENS)
            if problem is not None:
                self.report.bystander_failures += 1
                self.report.bystander_problems.append(f"bystander {i}: {problem}")
                tally.note(f"bystander {i}: {problem}")
        await self.poison_alone(tally)

    async def poison_alone(self, tally: Tally) -> None:
        """Each poison request once more, on its own, so a failure names its input."""
        for name, path, body in poison_bodies():
            await self.settle(self.args.settle_s)
            before = tally.stream_errors
            answer = await self.send(tally, Case(f"alone: {name}", path, body, None))
            if tally.truncated:
                return
            self.report.poison_alone.append(PoisonResult(name, answer[0] if answer else None,
                                                         tally.stream_errors > before))

    async def poll_health(self, stop: asyncio.Event) -> tuple[float, int, int]:
        """(slowest answer in s, polls, failed polls) of GET /health every 100 ms until stop."""
        worst, polls, failures = 0.0, 0, 0
        async with httpx.AsyncClient(base_url=self.args.base_url, timeout=self.timeout_s) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    ok = (await client.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                worst, polls, failures = max(worst, time.monotonic() - start), polls + 1, failures + (not ok)
                try:
                    await asyncio.wait_for(stop.wait(), 0.1)
                except TimeoutError:
                    pass
        return worst, polls, failures

    async def big_request(self, tally: Tally, name: str, path: str, body: bytes) -> None:
        if not self.budget.take():
            tally.truncated = True
            return
        tally.requests += 1
        stop = asyncio.Event()
        poller = asyncio.ensure_future(self.poll_health(stop))
        await asyncio.sleep(0.3)  # a baseline poll before the big body goes out
        head = request_head("POST", path, self.host_header, self.args.api_key, len(body))
        out = await raw_exchange(self.host, self.port, head, body, self.timeout_s)
        stop.set()
        worst, polls, failures = await poller
        if out.status is None:
            tally.count(path, "hang" if out.error == "hang" else "no_response")
            tally.note(f"{name}: no answer ({out.error})")
        else:
            tally.record(path, name, out.status, out.body, "", True)
        self.report.big.append(BigResult(name, len(body), out.status, round(out.seconds, 3),
                                         out.answered_before_sent, round(worst, 3), polls, failures,
                                         out.error))

    async def phase_large(self, tally: Tally) -> None:
        size = int(self.args.big_mb * 1e6)
        words = "Once upon a time " * (size // 17)
        ids = ",".join(["1"] * (size // 2))
        big = [("completions text prompt", COMPLETIONS, encode({"prompt": words, "max_tokens": 1})),
               ("completions token-id prompt", COMPLETIONS, f'{{"prompt":[{ids}],"max_tokens":1}}'.encode()),
               ("chat message", CHAT,
                encode({"messages": [{"role": "user", "content": words}], "max_tokens": 1})),
               ("tokenize prompt", TOKENIZE, encode({"prompt": words}))]
        del words, ids
        for name, path, body in big:
            await self.big_request(tally, name, path, body)
        del big
        await self.settle(self.args.settle_s)
        self.report.rss_after_big_bytes = await self.rss_bytes()
        huge = [("n=10000", COMPLETIONS, {"prompt": "x", "max_tokens": 16, "n": 10000}),
                ("chat n=10000", CHAT, {"messages": USER, "max_tokens": 16, "n": 10000}),
                ("n=2**63", COMPLETIONS, {"prompt": "x", "max_tokens": 16, "n": 2**63})]
        for name, path, body in huge:
            start = time.monotonic()
            answer = await self.send(tally, Case(name, path, body, None))
            seconds = round(time.monotonic() - start, 3)
            after = await self.send(tally, Case(f"normal right after {name}", COMPLETIONS,
                                                {"prompt": "Hello", "max_tokens": 4}, False))
            if tally.truncated:
                return
            self.report.huge_n.append(HugeNResult(name, answer[0] if answer else None, seconds,
                                                  after[0] if after else None))

    async def drop(self, tally: Tally, kind: str, abrupt: bool) -> None:
        """One client that goes away: mid_body (Content-Length promised, 100 bytes sent), mid_stream
        (after the first event) or mid_request (a non-streamed request, 0.3 s in)."""
        if not self.budget.take():
            tally.truncated = True
            return
        tally.requests += 1
        body = encode({"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True,
                       "stream": kind == "mid_stream"})
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as e:
            tally.count(COMPLETIONS, "no_response")
            tally.note(f"{kind}: connect {e!r}")
            return
        length = 10_000 if kind == "mid_body" else len(body)
        writer.write(request_head("POST", COMPLETIONS, self.host_header, self.args.api_key, length))
        writer.write(body[:100] if kind == "mid_body" else body)
        label = f"client_dropped_{kind}{'_rst' if abrupt else ''}"
        try:
            if kind == "mid_stream":
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
                status = int(head.split()[1])
                if status != 200:
                    label = status_kind(status)
                    tally.note(f"{kind}: HTTP {status}")
                else:
                    await asyncio.wait_for(reader.readuntil(b"data:"), self.timeout_s)
            else:
                await writer.drain()
                await asyncio.sleep(0.05 if kind == "mid_body" else 0.3)
        except TimeoutError:
            label = "hang"
            tally.note(f"{kind}: hang")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            label = "no_response"
            tally.note(f"{kind}: {e!r}"[:300])
        tally.count(COMPLETIONS, label)
        if abrupt:
            reset(writer)
        else:
            writer.close()

    async def hold_open(self, kind: str, bound_s: float) -> SlowResult:
        """A request that never finishes: when (and with what) does the server close it?"""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        if kind == "partial_body":
            head = request_head("POST", COMPLETIONS, self.host_header, self.args.api_key, 1000)
            writer.write(head + b'{"prompt": "')
        elif kind == "partial_headers":
            writer.write(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-".encode())
        start, answer = time.monotonic(), b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), bound_s - (time.monotonic() - start)):
                answer += chunk
        except TimeoutError:
            writer.transport.abort()
            return SlowResult(kind, None, None)
        except OSError:
            pass
        writer.transport.abort()
        status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else None
        return SlowResult(kind, round(time.monotonic() - start, 3), status)

    async def phase_disconnect(self, tally: Tally) -> None:
        for i in range(self.args.disconnects):
            for kind in ("mid_body", "mid_stream", "mid_request"):
                await self.drop(tally, kind, abrupt=i % 2 == 1)
        settled = await self.settle(self.args.settle_s)
        self.report.abort_settle_s = None if settled is None else round(settled, 3)
        kinds = [("partial_body", "partial_headers", "silent")[i % 3] for i in range(self.args.slow_clients)]
        if not all(self.budget.take() for _ in kinds):
            tally.truncated = True
            return
        tally.requests += len(kinds)
        bound_s = self.args.slow_timeout_s
        holders = asyncio.gather(*(self.hold_open(k, bound_s) for k in kinds), return_exceptions=True)
        await asyncio.sleep(1.0)
        start = time.monotonic()
        self.report.health_during_slow_status = await self.health_status()
        self.report.health_during_slow_s = round(time.monotonic() - start, 3)
        normal = await self.send(tally, Case("normal among half-sent", COMPLETIONS,
                                             VALID_BASES[COMPLETIONS], False))
        self.report.normal_during_slow_status = normal[0] if normal else None
        for kind, result in zip(kinds, await holders):
            if isinstance(result, BaseException):
                tally.note(f"{kind}: {result!r}")
                result = SlowResult(kind, None, None, repr(result)[:200])
            self.report.slow.append(result)
            tally.count("(half-sent)", "no_response" if result.error else
                        "closed_by_server" if result.closed_after_s is not None else "left_open")

    async def soak_one(self, tally: Tally) -> None:
        path = self.rng.choice([COMPLETIONS, CHAT])
        body = dict(VALID_BASES[path], max_tokens=self.rng.randint(1, 24), n=self.rng.randint(1, 4),
                    temperature=self.rng.choice([0, 0.7, 1.0]), stream=self.rng.random() < 0.5)
        case = Case(f"soak n={body['n']} stream={body['stream']}", path, body, False)
        if self.rng.random() >= self.args.soak_disconnect:
            await self.send(tally, case)
            return
        if not self.budget.take():
            tally.truncated = True
            return
        tally.requests += 1
        try:  # the client gives up early: the request is cancelled and its connection closed
            await asyncio.wait_for(self.client.post(path, json=body), self.rng.uniform(0.05, 1.0))
            tally.count(path, "2xx")
        except (TimeoutError, httpx.HTTPError):
            tally.count(path, "client_dropped")

    async def phase_soak(self, tally: Tally) -> None:
        end = min(time.monotonic() + self.args.soak_s, self.budget.deadline)

        async def worker() -> None:
            while time.monotonic() < end and not tally.truncated:
                await self.soak_one(tally)

        await asyncio.gather(*(worker() for _ in range(self.args.soak_concurrency)))

    async def watch_rss(self, stop: asyncio.Event) -> None:
        """The server's peak RSS; with --kill-server-over-rss-gib, SIGKILL it past that (a run on
        a shared machine must not let the server take the machine's memory)."""
        limit = self.args.kill_server_over_rss_gib
        while not stop.is_set() and (rss := vm_rss_bytes(self.args.pid)) is not None:
            self.report.rss_peak_bytes = max(rss, self.report.rss_peak_bytes or 0)
            if limit is not None and rss > limit * 2**30:
                os.kill(self.args.pid, signal.SIGKILL)
                self.report.killed_over_rss_bytes = rss
                print(f"server RSS {rss / 2**30:.1f} GiB > {limit:g} GiB: killed pid {self.args.pid}",
                      flush=True)
                return
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass

    async def run(self) -> Report:
        start = time.monotonic()
        await self.warm_up()
        self.report.rss_start_bytes = await self.rss_bytes()
        stop_watch = asyncio.Event()
        watcher = asyncio.ensure_future(self.watch_rss(stop_watch) if self.args.pid else asyncio.sleep(0))
        phases: dict[str, Callable[[Tally], Awaitable[None]]] = {
            "fuzz": self.phase_fuzz, "poison": self.phase_poison, "large": self.phase_large,
            "disconnect": self.phase_disconnect, "soak": self.phase_soak}
        for name in self.args.phases:
            if name == "soak" and self.args.soak_s <= 0:
                continue
            phase = phases[name]
            tally = self.report.phases[name] = Tally()
            phase_start = time.monotonic()
            print(f"phase {name} ...", flush=True)
            try:
                await phase(tally)
            except TimeoutError:
                tally.count("(phase)", "hang")
                tally.note(f"phase {name} timed out waiting for the server")
            tally.seconds = round(time.monotonic() - phase_start, 1)
            if (status := await self.health_status()) != 200:
                # a dead server or failed engine answers everything alike: later phases would
                # measure nothing (--phases runs them alone against a fresh server)
                self.report.server_lost_in = f"{name} (/health {status})"
                break
        await self.settle(self.args.settle_s)
        stop_watch.set()
        await watcher
        text = await self.metrics() or ""
        self.report.kv_used_end_bytes = metric_value(text, KV_USED)
        self.report.health_end_status = await self.health_status()
        self.report.rss_end_bytes = await self.rss_bytes()
        if self.report.rss_start_bytes and self.report.rss_end_bytes:
            self.report.rss_ratio = round(self.report.rss_end_bytes / self.report.rss_start_bytes, 3)
        self.report.seconds = round(time.monotonic() - start, 1)
        self.report.targets = targets(self.report)
        self.report.ok = all(t.ok is not False for t in self.report.targets)
        await self.client.aclose()
        return self.report


# ---- targets, table, JSON ------------------------------------------------------------------------


def targets(r: Report) -> list[Target]:
    """The issue's figures to reach, plus what the brief asks to be counted as zero."""
    tallies = list(r.phases.values())

    def zero(name: str, value: float | None) -> Target:
        return Target(name, value, "= 0", None if value is None else value == 0)

    health = r.max_health_latency_s
    return [
        zero("5xx answers + error events in 200 streams",
             sum(t.server_errors + t.stream_errors for t in tallies)),
        zero("requests dropped without an answer", sum(t.no_response for t in tallies)),
        zero(f"hangs (no answer in {r.budget['request_timeout_s']:g} s)", sum(t.hangs for t in tallies)),
        zero("non-2xx without the OpenAI error envelope", sum(t.envelope_violations for t in tallies)),
        zero("bystander failures", r.bystander_failures if r.bystanders else None),
        Target("max /health latency during a maximal request (s), every poll 200", health, "<= 1.0",
               None if health is None else health <= 1.0 and r.failed_health_polls == 0),
        zero("normal requests right after a huge n not answered 200",
             sum(h.after_status != 200 for h in r.huge_n) if r.huge_n else None),
        zero(f"half-sent requests still open after {r.slow_timeout_s:g} s", r.slow_left_open),
        zero("KV bytes used at the end", r.kv_used_end_bytes),
        Target("RSS end / start", r.rss_ratio, "<= 1.10",
               None if r.rss_ratio is None else r.rss_ratio <= 1.10),
        Target("/health at the end (status)", r.health_end_status, "= 200", r.health_end_status == 200),
    ]


def report_json(r: Report) -> dict:
    out = asdict(r)
    out["max_health_latency_s"] = r.max_health_latency_s
    out["slow_left_open"] = r.slow_left_open
    out["failed_health_polls"] = r.failed_health_polls
    for name, tally in r.phases.items():
        out["phases"][name]["server_errors"] = tally.server_errors
    return out


def print_report(r: Report) -> None:
    cols = ["phase", "requests", "2xx", "4xx", "5xx", "no answer", "hangs", "stream err", "envelope",
            "accepted bad", "seconds"]
    print("\n" + " | ".join(cols))
    for name, t in r.phases.items():
        n4 = sum(n for k, n in t.kinds.items() if k.startswith("4xx"))
        row = [name, t.requests, t.kinds.get("2xx", 0), n4, t.server_errors, t.no_response, t.hangs,
               t.stream_errors, t.envelope_violations, t.accepted_bad, t.seconds]
        print(" | ".join(str(v) for v in row) + (" (budget ran out)" if t.truncated else ""))
    for name, t in r.phases.items():
        print(f"\n{name}: " + ", ".join(f"{k} x{n}" for k, n in sorted(t.kinds.items())))
        for path, kinds in sorted(t.by_endpoint.items()):
            print(f"  {path}: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
        for line in t.examples[:12]:
            print(f"  - {line}")
    print("\nlarge request | bytes | status | seconds | refused before sent | max /health s | polls | "
          "failed polls")
    for b in r.big:
        print(f"{b.name} | {b.body_bytes} | {b.status} | {b.seconds} | {b.answered_before_sent} | "
              f"{b.max_health_latency_s} | {b.health_polls} | {b.health_failures}"
              + (f" ({b.error})" if b.error else ""))
    for h in r.huge_n:
        print(f"{h.name}: {h.status} in {h.seconds} s; a normal request right after: {h.after_status}")
    print(f"bystanders {r.bystanders}, failed {r.bystander_failures}; "
          f"poison requests among them {r.poison_requests}")
    if r.poison_alone:
        print("poison alone: " + ", ".join(f"{p.name} {p.status}{' (stream error)' if p.stream_error else ''}"
                                            for p in r.poison_alone))
    print(f"after the disconnects, settled (nothing running, no KV used) in: {r.abort_settle_s} s")
    closes = ", ".join(f"{s.kind} {s.closed_after_s if s.closed_after_s is not None else 'open'}"
                       + (f" ({s.answered})" if s.answered else "") for s in r.slow)
    print(f"half-sent requests, closed by the server after s: {closes}")
    print(f"while they were open: /health {r.health_during_slow_status} in {r.health_during_slow_s} s, "
          f"a normal request {r.normal_during_slow_status}")
    after_big = ""
    if r.rss_after_big_bytes and r.rss_start_bytes:
        after_big = f" ({r.rss_after_big_bytes / r.rss_start_bytes:.2f} x start)"
    print(f"RSS ({r.rss_source}): start {r.rss_start_bytes}, end {r.rss_end_bytes}, ratio {r.rss_ratio}, "
          f"peak {r.rss_peak_bytes}, after the maximal requests {r.rss_after_big_bytes}{after_big}")
    if r.killed_over_rss_bytes:
        print(f"the server was KILLED at RSS {r.killed_over_rss_bytes} (--kill-server-over-rss-gib)")
    if r.server_lost_in:
        print(f"the server was lost in phase {r.server_lost_in}; later phases were not run")
    print(f"KV used at the end: {r.kv_used_end_bytes}; /health at the end: {r.health_end_status}; "
          f"run {r.seconds} s")
    print("\ntarget | value | limit | met")
    for t in r.targets:
        met = "n/a (not measured)" if t.ok is None else ("yes" if t.ok else "NO")
        print(f"{t.name} | {t.value} | {t.limit} | {met}")
    print(f"\n{'all targets met' if r.ok else 'TARGETS MISSED'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--pid", type=int, default=None,
                   help="the server's process id, for its RSS (else /metrics)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--max-requests", type=int, default=2000, help="requests started, all phases together")
    p.add_argument("--duration-s", type=float, default=300.0, help="no request starts after this")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="longer than this is a hang")
    p.add_argument("--phases", type=lambda v: v.split(","), default=list(PHASES),
                   help=f"comma-separated, run in this order (default {','.join(PHASES)})")
    p.add_argument("--seed", type=int, default=0, help="for the random mutations and the soak")
    p.add_argument("--random-cases", type=int, default=80, help="random mutations in the fuzz phase")
    p.add_argument("--bystanders", type=int, default=8, help="streaming requests the poison runs among")
    p.add_argument("--poison-rounds", type=int, default=2, help="times each poison request is sent")
    p.add_argument("--big-mb", type=float, default=20.0, help="size of the maximal requests (MB)")
    p.add_argument("--disconnects", type=int, default=6, help="rounds of the three dropping clients")
    p.add_argument("--slow-clients", type=int, default=9, help="half-sent requests held open")
    p.add_argument("--slow-timeout-s", type=float, default=30.0, help="how long they are held")
    p.add_argument("--settle-s", type=float, default=15.0, help="wait for the KV to be freed, at most")
    p.add_argument("--soak-s", type=float, default=0.0, help="soak phase length; 0 = skipped")
    p.add_argument("--soak-concurrency", type=int, default=4)
    p.add_argument("--soak-disconnect", type=float, default=0.2, help="share of soak requests abandoned")
    p.add_argument("--kill-server-over-rss-gib", type=float, default=None,
                   help="SIGKILL --pid if its RSS passes this (guards a shared machine); default off")
    p.add_argument("--wait-ready-s", type=float, default=60.0, help="wait this long for /health first")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz_server.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if unknown := [p for p in args.phases if p not in PHASES]:
        print(f"fuzz_server: unknown phase {unknown[0]!r}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    if (problem := loopback_problem(args.base_url)) is not None:
        print(f"fuzz_server: {problem}", file=sys.stderr)
        return 2
    fuzzer = Fuzzer(args)

    async def go() -> Report | None:
        if not await fuzzer.wait_ready():
            await fuzzer.client.aclose()
            return None
        return await fuzzer.run()

    report = asyncio.run(go())
    if report is None:
        print(f"fuzz_server: {args.base_url}/health did not answer 200 within {args.wait_ready_s:g} s",
              file=sys.stderr)
        return 2
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report_json(report), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
