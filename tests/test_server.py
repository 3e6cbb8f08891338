"""`vattention serve` on the default model, driven by the official openai client over real HTTP;
then the parts on their own: the CLI's configs, the engine thread's failure and shutdown paths
(on a tiny random-weight model), and the stream's delta merging and framing.

Two servers run as subprocesses for the whole module: `main` (defaults) and `small` (--api-key,
one running sequence, one waiting) for authentication, overload and the SIGTERM shutdown, which
is the last test that uses them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import needs_model

openai = pytest.importorskip("openai", reason="the server tests drive it with the openai client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="vattention serve needs fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from vattention.engine.validation import RequestError  # noqa: E402
from vattention.outputs import CompletionOutput, Logprob, RequestOutput, RequestOutputKind  # noqa: E402
from vattention.sampling_params import SamplingParams  # noqa: E402
from vattention.server.async_engine import EngineStoppedError, RequestFailedError, RequestStream  # noqa: E402
from vattention.server.cli import ServerConfig, add_serve_args, serve_configs  # noqa: E402
from vattention.server.stream import DeltaTracker  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default model's served name
API_KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
USED = 'vattention:kv_cache_bytes{state="used"}'
ABORTED = 'vattention:request_success_total{finished_reason="abort"}'


class Server:
    def __init__(self, tmp: Path, cache: Path, name: str, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        # One torch thread each: two servers and the client share the CI machine's two cores.
        env = {**os.environ, "VATTENTION_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vattention.server.cli", "--host", "127.0.0.1", "--port",
                 str(self.port), "--device", "cpu", "--kv-cache-memory-gib", "1", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """{name{labels}: value} from /metrics."""
        text = httpx.get(self.url + "/metrics").text
        out = {}
        for family in parser.text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def idle(self) -> bool:
        """No sequence running or waiting, no KV byte holding a token."""
        m = self.metrics()
        return (m["vattention:num_requests_running"] == 0 == m["vattention:num_requests_waiting"]
                and m[USED] == 0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    if needs_model.args[0]:
        pytest.skip(needs_model.kwargs["reason"])
    converted = request.getfixturevalue("converted")
    tmp = tmp_path_factory.mktemp("servers")
    main = Server(tmp, converted["cache"], "main")
    small = Server(tmp, converted["cache"], "small", "--api-key", API_KEY, "--max-num-seqs", "1",
                   "--max-queued-requests", "1", "--served-model-name", "small",
                   "--request-read-timeout-s", "2", "--max-request-body-bytes", "100000")
    try:
        main.wait_ready()
        small.wait_ready()
        yield {"main": main, "small": small}
    finally:
        for server in (main, small):
            server.stop()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def client(main) -> openai.OpenAI:
    return main.client()


def wait_for(condition, what: str, timeout_s: float = 15):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- endpoints --------------------------------------------------------------------------------


def test_health_and_models_name_the_served_model(main, client):
    assert httpx.get(main.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streamed_completion_deltas_equal_the_greedy_text_and_usage(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    c = full.choices[0]
    assert "Paris" in c.text and c.finish_reason == "length"
    usage = full.usage
    assert (usage.completion_tokens, usage.total_tokens) == (10, 10 + usage.prompt_tokens)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    streamed = chunks[-1].usage
    assert chunks[-1].choices == [] and streamed.model_dump(exclude={"prompt_tokens_details"}) == \
        usage.model_dump(exclude={"prompt_tokens_details"})
    # the same prompt again: all of it but the last token comes from the prefix cache
    assert streamed.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_chat_answers_and_streams_the_same_text(main, client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                          max_completion_tokens=20)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"  # end of turn before 20
    prompt_len = httpx.post(main.url + "/tokenize", json={"messages": QUESTION}).json()["count"]
    assert full.usage.prompt_tokens == prompt_len
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-2].choices[0].finish_reason == "stop"
    streamed = chunks[-1].usage
    assert streamed.model_dump(exclude={"prompt_tokens_details"}) == \
        full.usage.model_dump(exclude={"prompt_tokens_details"})
    assert streamed.prompt_tokens_details.cached_tokens == prompt_len - 1  # asked before


def test_n_samples_are_indexed_and_counted(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=4, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=4, seed=7,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 12  # each choice's deltas counted once
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, n=2,
                                                 max_tokens=4, stream=True, seed=7))
    finished = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks
                if ch.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_stop_string_cuts_the_text_streamed_or_not(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 4]  # straddles tokens more often than not
    cut = client.completions.create(model=MODEL, prompt=PROMPT, stop=[stop, "never"], **GREEDY)
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, stop=stop, stream=True, **GREEDY)
    assert "".join(ch.choices[0].text for ch in chunks) == full[:full.index(stop)]


def test_logprobs_have_each_endpoints_shape(client):
    c = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob and max(top.values()) == logprob  # greedy
    streamed = [t for ch in client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2,
                                                      stream=True, **GREEDY)
                for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                          max_tokens=5, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_token_id_prompts_are_accepted(main, client):
    ids = httpx.post(main.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY).choices[0].text
    assert by_ids == client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text


def test_batched_prompts_answer_each_prompt_in_order_streamed_or_not(main, client):
    """A list of prompts (text or token ids) in one completions request: prompt p's n choices are
    indices p*n .. p*n+n-1 with the text a request of that prompt alone gets; usage sums them."""
    prompts = [PROMPT, "One plus one is", "The sea is"]
    alone = [client.completions.create(model=MODEL, prompt=p, **GREEDY) for p in prompts]
    batched = client.completions.create(model=MODEL, prompt=prompts, **GREEDY)
    assert [c.index for c in batched.choices] == [0, 1, 2]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(batched.usage, field) == sum(getattr(a.usage, field) for a in alone), field
    ids = [httpx.post(main.url + "/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert [c.text for c in by_ids.choices] == [c.text for c in batched.choices]

    seeded = dict(n=2, max_tokens=5, seed=3, temperature=1.0)
    pair = client.completions.create(model=MODEL, prompt=prompts[:2], **seeded)
    assert sorted(c.index for c in pair.choices) == [0, 1, 2, 3]
    second = client.completions.create(model=MODEL, prompt=prompts[1], **seeded)
    assert [c.text for c in pair.choices if c.index >= 2] == [c.text for c in second.choices]

    texts, usage = {}, None
    for ch in client.completions.create(model=MODEL, prompt=prompts, stream=True,
                                        stream_options={"include_usage": True}, **GREEDY):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = ch.usage or usage
    assert texts == {c.index: c.text for c in batched.choices}
    assert usage.completion_tokens == batched.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["x"] * 257, max_tokens=1)
    assert e.value.param == "prompt" and "at most 256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # one bad prompt: nothing runs
        client.completions.create(model=MODEL, prompt=[PROMPT, ""], max_tokens=1)
    assert e.value.param == "prompt"


def test_tokenize_and_detokenize_round_trip(main):
    r = httpx.post(main.url + "/tokenize", json={"prompt": "Hello, vAttention!"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 8192
    back = httpx.post(main.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello, vAttention!"}


def test_concurrent_clients_all_complete(main, client):
    def one(i: int) -> tuple[int, str]:
        if i % 2:
            chunks = client.completions.create(model=MODEL, prompt=f"{i} plus {i} is", max_tokens=6,
                                               stream=True, extra_body={"ignore_eos": True})
            return 6, "".join(ch.choices[0].text for ch in chunks)
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6,
                                           extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(n == 6 and text for n, text in results), results
    wait_for(main.idle, "an idle engine")


def test_client_disconnect_aborts_the_request_and_frees_its_kv(main, client):
    aborted = main.metrics().get(ABORTED, 0)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    m = main.metrics()
    assert m["vattention:num_requests_running"] == 1 and m[USED] > 0
    stream.close()
    wait_for(main.idle, "the streamed request's KV to be freed", timeout_s=10)
    # A non-streaming client that gives up (read timeout) is noticed through http.disconnect.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(main.url + "/v1/chat/completions", timeout=1.5, json={
            "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True})
    wait_for(main.idle, "the non-streamed request's KV to be freed", timeout_s=10)
    assert main.metrics()[ABORTED] == aborted + 2


def test_metrics_count_requests_tokens_and_kv_pages(main):
    m = main.metrics()
    assert m['vattention:request_success_total{finished_reason="length"}'] > 0
    assert m["vattention:generation_tokens_total"] > 0 and m["vattention:prompt_tokens_total"] > 0
    assert m["vattention:time_to_first_token_seconds_count"] > 0
    assert m['vattention:kv_cache_bytes{state="capacity"}'] == 1 << 30
    page = m["vattention:kv_cache_page_bytes"]
    total, free = m['vattention:kv_cache_pages{state="total"}'], m['vattention:kv_cache_pages{state="free"}']
    assert page == 2 << 20 and total * page == 1 << 30
    assert 0 < m['vattention:kv_cache_pages{state="mapped"}'] <= total - free
    assert m['vattention:kv_cache_pages{state="mapped"}'] * page == m['vattention:kv_cache_bytes{state="committed"}']
    mapped = ("vattention:kv_pages_mapped_critical_total",
              "vattention:kv_pages_mapped_background_total")
    assert sum(m[name] for name in mapped) > 0


def test_a_repeated_prompt_reports_its_cached_tokens_and_salts_keep_tenants_apart(main, client):
    prompt = "The history of the printing press begins in the fifteenth century, when " * 4
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"cache_salt": "tenant-a"})
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"cache_salt": "tenant-a"})
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1  # all but the last token
    assert again.choices[0].text == first.choices[0].text
    other = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"cache_salt": "tenant-b"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"cache_salt": "tenant-b"})
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens == n - 1
    m = main.metrics()
    assert m["vattention:prefix_cache_hits_total"] >= 2 * (n - 1)
    assert m["vattention:prefix_cache_queries_total"] >= 4 * n


# ---- errors ---------------------------------------------------------------------------------


def test_invalid_parameters_are_400_naming_the_param(main, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert e.value.param == "temperature" and "temperature must be a finite number >= 0" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True,
                                       top_logprobs=30)
    assert e.value.param == "top_logprobs"
    r = httpx.post(main.url + "/v1/completions",
                   json={"model": MODEL, "prompt": PROMPT, "top_p": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    for body in ({"best_of": 2, "stream": True}, {"n": 2, "best_of": 1}):  # best_of streamed, or < n
        r = httpx.post(main.url + "/v1/completions", json={"prompt": PROMPT, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", body


def test_unset_sampling_parameters_take_the_models_defaults(client):
    """The built-in model's generation_config.json says greedy: a request that names no
    temperature gets the greedy text (OpenAI's own default, 1.0, would sample)."""
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    unset = {k: v for k, v in GREEDY.items() if k != "temperature"}
    for _ in range(2):
        assert client.completions.create(model=MODEL, prompt=PROMPT, **unset).choices[0].text == greedy


def test_logit_bias_forces_or_bans_tokens_and_bad_ids_are_400(main, client):
    """OpenAI's logit_bias: +100 on one token makes greedy output only it; -100 on the greedy
    first token makes the output start differently; ids outside the vocabulary name the param."""
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=0, **GREEDY).choices[0]
    forced_id = 1530
    forced = client.completions.create(model=MODEL, prompt=PROMPT, logit_bias={str(forced_id): 100},
                                      **GREEDY).choices[0].text
    detok = httpx.post(main.url + "/detokenize", json={"tokens": [forced_id] * 10}).json()["prompt"]
    assert forced == detok
    first_token = greedy.logprobs.tokens[0]
    first_id = httpx.post(main.url + "/tokenize", json={"prompt": PROMPT + first_token,
                                                        "add_special_tokens": False}).json()["tokens"][-1]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, logit_bias={str(first_id): -100},
                                       **GREEDY).choices[0].text
    assert not banned.startswith(first_token) and banned != greedy.text
    for bias in ({"49152": 5}, {"x": 5}, {"3": 500}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, logit_bias=bias, max_tokens=2)
        assert e.value.param == "logit_bias", (bias, e.value.message)


def test_prompt_plus_max_tokens_over_the_context_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=9000)
    message = e.value.message
    assert "maximum context length is 8192 tokens" in message
    prompt_len = int(message.split("(")[1].split(" in the messages")[0])
    assert f"you requested {prompt_len + 9000} tokens" in message
    assert "9000 in the completion" in message
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt=PROMPT, max_tokens=1)
    assert e.value.code == "model_not_found" and "gpt-5" in e.value.message


@pytest.mark.parametrize("body", [b'{"model": "x", "prompt": ', b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400_without_a_traceback(main, body):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = httpx.post(main.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text and "File \"" not in r.text


def test_api_key_is_required_when_set(servers):
    small = servers["small"]
    with pytest.raises(openai.AuthenticationError) as e:
        small.client("wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(small.url + "/v1/completions", json={"prompt": PROMPT})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in small.client(API_KEY).models.list().data] == ["small"]
    assert httpx.get(small.url + "/health").status_code == 200  # health needs no key


def test_overload_is_503(servers):
    small = servers["small"]
    client = small.client(API_KEY)
    params = {"model": "small", "prompt": PROMPT, "max_tokens": 2000, "stream": True,
              "extra_body": {"ignore_eos": True}}
    running = client.completions.create(**params)
    next(iter(running))  # the one running slot is taken
    waiting = client.completions.create(**params)  # returns once the engine queued it
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="small", prompt=PROMPT, max_tokens=1)
    assert e.value.status_code == 503 and "overloaded" in e.value.message
    running.close()
    waiting.close()
    wait_for(small.idle, "both aborted")


# ---- hostile input --------------------------------------------------------------------------


def rss_bytes(server: Server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_a_numerically_dangerous_request_is_served_and_bystanders_finish(main, client):
    """top_p=1e-50 / repetition_penalty=1e-40 at temperature 1 used to overflow inside the step
    and fail every stream in flight with a 500; now they sample (top-p keeps the most likely
    token) and the bystanders' streams end normally with all their tokens."""
    def bystander(i: int) -> tuple[int, str | None]:
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                                max_tokens=24, stream=True, temperature=0,
                                                extra_body={"ignore_eos": True}))
        return sum(1 for ch in chunks if ch.choices and ch.choices[0].text), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(bystander, i) for i in range(4)]
        time.sleep(0.5)
        for poison in ({"top_p": 1e-50}, {"repetition_penalty": 1e-40}, {"repetition_penalty": 1e40}):
            r = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=1,
                                          extra_body={"ignore_eos": True, **poison})
            assert r.usage.completion_tokens == 4, poison
        results = [f.result() for f in streams]
    assert all(reason == "length" for _, reason in results), results
    wait_for(main.idle, "an idle engine")


def test_a_body_over_the_limit_is_413_and_a_prompt_far_over_the_context_is_400_untokenized(main):
    big = "word " * (4 << 20)  # 20 MiB: over the default 16 MiB body limit
    r = httpx.post(main.url + "/v1/completions", json={"prompt": big, "max_tokens": 1}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # 12 MiB of text: within the body limit, but more characters than 8192 tokens can spell
    start = time.monotonic()
    r = httpx.post(main.url + "/tokenize", json={"prompt": big[:12 << 20]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"] and r.json()["error"]["param"] == "prompt"
    assert time.monotonic() - start < 10  # refused without tokenizing (that would take ~25 s)
    r = httpx.post(main.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": big[:12 << 20]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_health_answers_while_large_prompts_are_tokenized_and_memory_is_given_back(main):
    """24 prompts of 600K characters (14 MiB) must each be tokenized to learn they do not fit:
    seconds of work, done on a worker thread, so /health keeps answering at once; afterwards the
    freed heap goes back to the OS (before: RSS grew by GBs and stayed)."""
    prompts = [f"{i} " + "word " * 120_000 for i in range(24)]
    rss_before = rss_bytes(main)
    latencies = []

    def poll_health(stop: list[bool]) -> None:
        while not stop[0]:
            start = time.monotonic()
            assert httpx.get(main.url + "/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)

    stop = [False]
    with ThreadPoolExecutor(1) as pool:
        poller = pool.submit(poll_health, stop)
        start = time.monotonic()
        r = httpx.post(main.url + "/v1/completions", json={"prompt": prompts, "max_tokens": 1},
                       timeout=120)
        busy_s = time.monotonic() - start
        stop[0] = True
        poller.result()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert busy_s > 2, f"the request took {busy_s:.1f} s: too little work to test anything"
    assert len(latencies) > 5 and max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s"
    # The server frees the prompts and trims the heap once it has answered, so this may lag the 400.
    bound = rss_before * 1.10 + (32 << 20)
    wait_for(lambda: rss_bytes(main) < bound, f"RSS back under {bound / 2**20:.0f} MiB "
             f"(from {rss_before / 2**20:.0f} MiB before)", timeout_s=10)


def test_n_is_bounded_and_counts_against_the_queue_before_admission(main, client, servers):
    for n in (129, 10000):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, n=n, max_tokens=1)
        assert e.value.param == "n", e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # 9 prompts x 128 > --max-queued-requests 1024
        client.completions.create(model=MODEL, prompt=[PROMPT] * 9, n=128, max_tokens=1)
    assert e.value.param == "n" and "1152 sequences" in e.value.message
    small = servers["small"].client(API_KEY)
    with pytest.raises(openai.BadRequestError) as e:  # two prompts against a queue of one
        small.completions.create(model="small", prompt=[PROMPT, PROMPT], max_tokens=1)
    assert e.value.param == "n"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices  # still served
    wait_for(main.idle, "an idle engine")


def test_bad_values_that_used_to_pass_are_400_naming_the_field(main):
    cases = [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        (b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
        (b'{"prompt": "hi", "temperature": 1e309}', "temperature"),
        (b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
        ({"prompt": "hi", "seed": 2 ** 64}, "seed"),
    ]
    for body, param in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        r = httpx.post(main.url + path, headers={"content-type": "application/json"}, **kwargs)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert "[-2**63, 2**63 - 1]" in r.json()["error"]["message"]
    r = httpx.post(main.url + "/v1/completions", json={"prompt": "hi", "n": "2", "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2  # coerced, as vLLM does


def _raw_request(server: Server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(data)
    return sock


def test_disconnects_are_one_info_line_not_errors(main):
    log_start = len(main.log.read_text())
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(3):  # drops in the middle of its body
        _raw_request(main, head + body[:10]).close()
    for _ in range(3):  # sends a whole non-streaming request, then leaves
        sock = _raw_request(main, head + body)
        time.sleep(0.3)
        sock.close()
    wait_for(main.idle, "the abandoned requests to be aborted")
    time.sleep(0.5)
    log = main.log.read_text()[log_start:]
    assert log.count("disconnected before sending all of POST /v1/completions") == 3, log
    assert "Traceback" not in log and "never retrieved" not in log and " 500" not in log, log


def test_a_connection_that_never_finishes_its_request_is_closed(servers):
    """--request-read-timeout-s 2 on `small`: silent, half-headed and half-bodied connections
    are all closed by the server."""
    small = servers["small"]
    socks = [_raw_request(small, b""),
             _raw_request(small, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"),
             _raw_request(small, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")]
    start = time.monotonic()
    for sock in socks:
        assert sock.recv(4096) in (b"", ), "the server answered instead of closing"  # closed by the peer
        sock.close()
    assert time.monotonic() - start < 12
    assert httpx.get(small.url + "/health").status_code == 200
    log = small.log.read_text()
    assert "did not arrive within 2 s" in log and "Traceback" not in log, log[-3000:]


def test_a_small_servers_body_limit_is_its_own(servers):
    r = httpx.post(servers["small"].url + "/tokenize", json={"prompt": "x" * 200_000})
    assert r.status_code == 413 and "100000 bytes" in r.json()["error"]["message"]


def test_sigterm_lets_in_flight_requests_finish_then_exits_cleanly(servers):
    """Runs last: it stops the `small` server."""
    small = servers["small"]
    stream = small.client(API_KEY).chat.completions.create(
        model="small", messages=QUESTION, max_tokens=8, stream=True,
        extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    small.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    # uvicorn re-raises the signal once it has shut down, so the exit reads as "killed by SIGTERM".
    assert small.proc.wait(60) in (0, -signal.SIGTERM)
    log = small.log.read_text()
    assert "engine stopped" in log and "Application shutdown complete" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# ---- the parts on their own -----------------------------------------------------------------


def test_serve_flags_become_configs():
    cli = argparse.ArgumentParser()
    add_serve_args(cli)
    server, engine = serve_configs(cli.parse_args(["/models/x", "--port", "9001",
                                                   "--max-num-seqs", "3", "--api-key", "k"]))
    assert (server.port, server.api_key, server.served_model_name) == (9001, "k", "/models/x")
    assert engine.model.model == "/models/x" and engine.scheduler.max_num_seqs == 3
    server, engine = serve_configs(cli.parse_args([]))
    assert server == ServerConfig(served_model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                                  api_key=os.environ.get("VATTENTION_API_KEY"))
    assert engine.model.model is None  # the built-in default model
    with pytest.raises(ValueError, match="given twice"):
        serve_configs(cli.parse_args(["a", "--model", "b"]))


DELTA = RequestOutputKind.DELTA


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def num_tokens(outs: list[RequestOutput]) -> int:
    """Tokens in a request's delta outputs, all choices."""
    return sum(len(c.token_ids) for out in outs for c in out.outputs)


def test_a_failing_step_fails_the_requests_in_flight_and_the_loop_goes_on(tiny_engine):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind=DELTA)

    def broken_step():
        raise RuntimeError("injected step failure")

    async def scenario():
        tiny_engine.engine.step = broken_step  # shadows the method on this instance
        stream = await tiny_engine.add("a", [1, 2, 3], params)
        with pytest.raises(RequestFailedError, match="injected step failure"):
            await collect(stream)
        del tiny_engine.engine.step
        outs = await collect(await tiny_engine.add("b", [1, 2, 3], params))
        assert outs[-1].finished and num_tokens(outs) == outs[-1].outputs[0].num_tokens == 4

    asyncio.run(scenario())
    assert tiny_engine.stats.engine.num_running == 0 and tiny_engine.stats.engine.kv.bytes_used == 0


def test_a_request_whose_sampling_fails_fails_alone_in_the_server_loop(tiny_engine):
    """Only the poisoned request's stream gets the error; the others finish with every token."""
    from vattention.sampling import Sampler

    class Poisoned(Sampler):
        def sample(self, logits, batch):
            if any(p.max_tokens == 7 for p in batch.params):
                raise RuntimeError("injected sampling failure")
            return super().sample(logits, batch)

    good = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=DELTA)

    async def scenario():
        tiny_engine.engine.runner.sampler = Poisoned()
        try:
            bystanders = [await tiny_engine.add(f"ok{i}", [1, 2, 3 + i], good) for i in range(3)]
            poison = await tiny_engine.add("bad", [4, 5], SamplingParams(max_tokens=7, ignore_eos=True,
                                                                         output_kind=DELTA))
            with pytest.raises(RequestFailedError, match="injected sampling failure"):
                await collect(poison)
            for stream in bystanders:
                outs = await collect(stream)
                assert outs[-1].finished and num_tokens(outs) == 12
        finally:
            tiny_engine.engine.runner.sampler = Sampler()

    asyncio.run(scenario())
    assert tiny_engine.stats.failure is None and tiny_engine.stats.engine.kv.bytes_used == 0


def test_a_batched_request_is_admitted_whole_or_not_at_all(tiny_engine):
    from vattention.server.async_engine import EngineOverloadedError, Submission

    async def scenario():
        tiny_engine.max_queued_requests = 3
        try:
            params = SamplingParams(n=2, max_tokens=2, output_kind=DELTA)
            subs = [Submission(f"p{i}", [1, 2, 3], params) for i in range(2)]
            with pytest.raises(EngineOverloadedError, match="this request adds 4"):
                await tiny_engine.add_all(subs)
            assert not tiny_engine.engine.has_unfinished()  # no prompt of it was queued
            streams = await tiny_engine.add_all(subs[:1])
            assert (await collect(streams[0]))[-1].finished
        finally:
            tiny_engine.max_queued_requests = 1024

    asyncio.run(scenario())


def test_shutdown_aborts_what_outlives_the_timeout_then_refuses_requests(tiny_engine):
    async def scenario():
        stream = await tiny_engine.add("long", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True,
                                                                         output_kind=DELTA))
        await stream.__anext__()  # running
        await asyncio.to_thread(tiny_engine.shutdown, 0.0)
        with pytest.raises(RequestFailedError, match="shut down"):
            await collect(stream)
        with pytest.raises(EngineStoppedError):
            await tiny_engine.add("late", [1, 2, 3], SamplingParams(output_kind=DELTA))

    asyncio.run(scenario())


def test_the_engines_refusal_keeps_the_field_it_names(tiny_engine):
    """add_request's RequestError reaches the handler whole (errors.py answers it with its param);
    cumulative outputs, which the stream cannot merge, are refused before queueing."""
    async def scenario():
        with pytest.raises(RequestError) as e:
            await tiny_engine.add("oov", [1, 300], SamplingParams(output_kind=DELTA))
        assert e.value.param == "prompt" and "out of range [0, 300)" in str(e.value)
        with pytest.raises(ValueError, match="DELTA or FINAL_ONLY"):
            await tiny_engine.add("cumulative", [1, 2], SamplingParams())

    asyncio.run(scenario())
    assert not tiny_engine.engine.has_unfinished()


def delta(index: int, text: str, token_ids: list[int], num_tokens: int, finish: str | None = None,
          logprobs: bool = False) -> CompletionOutput:
    lps = [Logprob(t, -1.0, str(t)) for t in token_ids] if logprobs else None
    return CompletionOutput(index, text, token_ids, finish, "x" if finish else None, lps,
                            [[lp] for lp in lps] if logprobs else None, num_tokens=num_tokens)


def test_a_lagging_reader_gets_the_queued_deltas_merged_never_dropped():
    """Deltas queued while the handler was busy come out as one output per read: each choice's
    text, tokens and logprobs concatenated, the latest finish and count; an error comes after."""
    async def scenario():
        stream = RequestStream("r", asyncio.get_running_loop())
        for choices in ([delta(0, "a", [1], 1, logprobs=True)],
                        [delta(1, "x", [7], 1, logprobs=True), delta(0, "b", [2], 2, logprobs=True)],
                        [delta(0, "", [3], 3, logprobs=True)]):
            stream.put(RequestOutput("r", None, [5], choices))
        stream.put(RuntimeError("failed later"))
        await asyncio.sleep(0)  # the puts land
        out = await stream.__anext__()
        first, second = sorted(out.outputs, key=lambda c: c.index)
        assert (first.text, first.token_ids, first.num_tokens) == ("ab", [1, 2, 3], 3)
        assert [lp.token_id for lp in first.logprobs] == [1, 2, 3] and len(first.top_logprobs) == 3
        assert (second.text, second.token_ids) == ("x", [7])
        with pytest.raises(RuntimeError, match="failed later"):
            await stream.__anext__()
        assert stream.finished

        stream = RequestStream("s", asyncio.get_running_loop())
        stream.put(RequestOutput("s", None, [5], [delta(0, "a", [1], 1)]))
        stream.put(RequestOutput("s", None, [5], [delta(0, "b", [2], 2, finish="stop")], finished=True))
        await asyncio.sleep(0)
        out = await stream.__anext__()
        assert out.finished and out.outputs[0].text == "ab" and out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].stop_reason == "x" and [c async for c in stream] == []

    asyncio.run(scenario())


def test_chunks_forward_the_engines_deltas_with_the_echo_first_and_running_offsets():
    """The tracker cuts nothing: a chunk is the delta, the echoed prompt goes before a choice's
    first text only, logprob offsets continue across chunks, a delta with no text (held back by
    the engine) and no logprobs sends no chunk."""
    tracker = DeltaTracker("Q: ")
    out = tracker.update(RequestOutput("r", None, [5], [delta(0, "ab", [1, 2], 2, logprobs=True),
                                                        delta(1, "", [9], 1)]))
    assert [(d.index, d.first, d.text, d.text_offset) for d in out] == [(0, True, "Q: ab", 3)]
    out = tracker.update(RequestOutput("r", None, [5], [delta(0, "c", [3], 3, logprobs=True),
                                                        delta(1, "zz", [8], 2, finish="length")]))
    assert [(d.index, d.first, d.text, d.text_offset, d.finish_reason) for d in out] == \
        [(0, False, "c", 5, None), (1, True, "Q: zz", 3, "length")]
    assert [lp.token_id for lp in out[0].logprobs] == [3]
