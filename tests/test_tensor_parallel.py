"""Tensor parallelism on CPU with gloo, in real processes: TP=2 gives TP=1's greedy tokens on
random checkpoints (logprobs within 1e-4: only the all-reduce's summation order differs); each
rank loads exactly its slices; a rank that fails mid-step, a rank whose KV decision differs and a
rank that is killed all stop the engine with an error that names the rank, never a hang; a
worker's exit is read only once its process is reaped, within a bound."""

from __future__ import annotations

import os
import queue
import re
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vattention import LLM, SamplingParams
from vattention.distributed import WorkerProcesses
from vattention.engine.tp import Coordinator, TensorParallelError
from vattention.models.loader import build_model, load_safetensors, resolve_arch_config
from vattention.models.sharding import Shard

from engine_helpers import make_checkpoint

PROMPTS = [[5, 9, 13], list(range(20, 61)), [7], list(range(100, 117))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
HANG_GUARD_S = 120  # a test that takes longer is hanging: fail it instead of waiting forever
# what rank 0's error says of a worker killed with SIGKILL
KILLED = f"rank 1 was killed by signal SIGKILL (exit code -{signal.SIGKILL.value})"


@pytest.fixture(autouse=True)
def no_hang():
    def fail(*_):
        raise TimeoutError(f"no result within {HANG_GUARD_S} s: the engine hangs")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(HANG_GUARD_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def make_llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", kv_cache_memory_gib=0.05, page_size=64 << 10)
    options.update(kwargs)
    return LLM(model=str(path), **options)


def run(path, prompts=PROMPTS, params=GREEDY, **kwargs):
    llm = make_llm(path, **kwargs)
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.close()
    return ([o.outputs[0].token_ids for o in outs],
            [[lp.logprob for lp in o.outputs[0].logprobs or []] for o in outs])


@pytest.mark.parametrize("family,overrides,options", [
    ("llama", {}, {}),
    ("mistral", {}, {}),
    ("qwen2", {}, {}),  # q/k/v biases sharded with their rows
    ("qwen3", {}, {}),  # q/k norms whole on each rank
    ("phi3", {}, {}),  # fused qkv / gate_up checkpoint tensors split, then sliced per rank
    ("gemma2", {}, {}),  # windowed + soft-capped layers, scaled and tied vocabulary slices
    ("gemma3", {}, {"kv_cache": "paged", "block_size": 8}),  # q/k norms, two ropes
    ("mixtral", {}, {}),  # every expert's columns / rows sliced, routers whole
    ("qwen3moe", {}, {"max_num_batched_tokens": 7}),  # sparse and dense layers, chunked
    ("llama", {"num_key_value_heads": 1}, {}),  # one KV head: both ranks hold (replicate) it
    ("llama", {"vocab_size": 321}, {"kv_cache": "paged", "block_size": 8}),  # vocabulary padded
    ("llama", {"tie_word_embeddings": True}, {"layout": "per_layer", "max_num_batched_tokens": 7}),
], ids=["llama", "mistral", "qwen2-bias", "qwen3-qk-norm", "phi3-fused", "gemma2", "gemma3-paged", "mixtral", "qwen3moe-chunked",
        "kv-heads-replicated", "paged-odd-vocab", "tied-per-layer-chunked"])
def test_tp2_gives_tp1_greedy_tokens(tmp_path, family, overrides, options):
    make_checkpoint(family, tmp_path, **overrides)
    want_tokens, want_logprobs = run(tmp_path, **options)
    got_tokens, got_logprobs = run(tmp_path, tensor_parallel_size=2, **options)
    assert got_tokens == want_tokens
    diff = max(abs(a - b) for x, y in zip(got_logprobs, want_logprobs) for a, b in zip(x, y))
    assert diff < 1e-4, f"logprobs differ by {diff:.2e}"


def test_tp2_preempts_exactly_like_tp1(tmp_path):
    """A budget too small for all requests: rank 0's preemptions are replayed on rank 1 and the
    outputs still equal TP=1's."""
    make_checkpoint("llama", tmp_path)
    prompts = [list(range(10 + i, 50 + i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    tight = dict(page_size=4096, kv_cache_memory_gib=24 * 4096 / (1 << 30))  # 24 pages per rank
    want, _ = run(tmp_path, prompts, params, page_size=4096, kv_cache_memory_gib=48 * 4096 / (1 << 30))
    llm = make_llm(tmp_path, tensor_parallel_size=2, **tight)
    engine = llm.engine
    requests = [engine.add_request(p, params) for p in prompts]
    preemptions, done = 0, {}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                done[out.request_id] = out.outputs[0].token_ids
            preemptions = max(preemptions, sum(r.num_preemptions for g in engine._groups.values() for r in g))
    finally:
        llm.close()
    assert preemptions > 0
    assert [done[r] for r in requests] == want


@pytest.mark.parametrize("options", [dict(page_size=4096), dict(kv_cache="paged", block_size=8)],
                         ids=["vattention", "paged"])
def test_tp2_ranks_replay_the_same_prefix_hits(tmp_path, options):
    """Prompts sharing a start, run in two waves: the second finds the first's prefixes cached
    on every rank (each rank redoes the lookup and must agree with rank 0's length, else the
    engine fails), and the tokens equal TP=1's with caching off."""
    make_checkpoint("llama", tmp_path)
    stem = list(range(30, 90))
    prompts = [stem + [5, 6], stem[:41] + [7], stem + list(range(100, 120)), stem[:20]]
    want, _ = run(tmp_path, prompts, enable_prefix_caching=False, **options)
    llm = make_llm(tmp_path, tensor_parallel_size=2, **options)
    try:
        first = llm.generate(prompts[:1], GREEDY)
        rest = llm.generate(prompts[1:], GREEDY)
        stats = llm.engine.stats()
    finally:
        llm.close()
    assert [o.outputs[0].token_ids for o in first + rest] == want
    assert all(o.num_cached_tokens > 0 for o in rest)
    assert stats.prefix_cache_hits == sum(o.num_cached_tokens for o in rest)


@pytest.mark.parametrize("family,overrides", [("qwen2", {}), ("llama", {"num_key_value_heads": 1,
                                                                         "vocab_size": 321})])
def test_each_rank_loads_exactly_its_slices(tmp_path, family, overrides):
    """Sharded loading: rank r's parameters are the rows/columns Megatron assigns it, read from
    the same safetensors file (get_slice), padding rows zero."""
    hf = make_checkpoint(family, tmp_path, **overrides)
    full = hf.state_dict()
    cfg = resolve_arch_config(tmp_path)
    d, heads_per_rank = cfg.head_dim, cfg.num_heads // 2
    for rank in range(2):
        model = build_model(cfg, torch.device("cpu"), torch.float32, Shard(rank, 2))
        load_safetensors(model, Path(tmp_path))
        got = dict(model.named_parameters())
        attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
        q_rows = slice(rank * heads_per_rank * d, (rank + 1) * heads_per_rank * d)
        kv_heads = max(1, cfg.num_kv_heads // 2)
        kv_start = rank * kv_heads if cfg.num_kv_heads >= 2 else rank * cfg.num_kv_heads // 2
        kv_rows = slice(kv_start * d, (kv_start + kv_heads) * d)
        width = cfg.intermediate_size // 2
        q, kv = heads_per_rank * d, kv_heads * d  # qkv_proj rows: this rank's q, then k, then v
        qkv = got[attn + "qkv_proj.weight"]
        torch.testing.assert_close(qkv[:q], full[attn + "q_proj.weight"][q_rows])
        torch.testing.assert_close(qkv[q:q + kv], full[attn + "k_proj.weight"][kv_rows])
        torch.testing.assert_close(got[attn + "o_proj.weight"], full[attn + "o_proj.weight"][:, q_rows])
        torch.testing.assert_close(got[mlp + "gate_up_proj.weight"][width:],  # gate rows, then up rows
                                   full[mlp + "up_proj.weight"][rank * width:(rank + 1) * width])
        torch.testing.assert_close(got[mlp + "down_proj.weight"],
                                   full[mlp + "down_proj.weight"][:, rank * width:(rank + 1) * width])
        torch.testing.assert_close(got["model.norm.weight"], full["model.norm.weight"])
        if cfg.attention_bias:
            torch.testing.assert_close(got[attn + "qkv_proj.bias"][:q], full[attn + "q_proj.bias"][q_rows])
        rows = -(-cfg.vocab_size // 2)
        embed = got["model.embed_tokens.weight"]
        real = full["model.embed_tokens.weight"][rank * rows:(rank + 1) * rows]
        torch.testing.assert_close(embed[:len(real)], real)
        assert not embed[len(real):].any(), "padding rows of the vocabulary must be zero"


def test_each_rank_loads_its_columns_of_every_expert(tmp_path):
    """Mixtral's checkpoint names (block_sparse_moe.experts.e.w1 / w3 / w2): rank r's stacked
    experts hold its rows of each gate and up and its columns of each down; routers whole."""
    from safetensors.torch import load_file
    make_checkpoint("mixtral", tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    cfg = resolve_arch_config(tmp_path)
    width = cfg.moe_intermediate_size // 2
    for rank in range(2):
        model = build_model(cfg, torch.device("cpu"), torch.float32, Shard(rank, 2))
        load_safetensors(model, Path(tmp_path))
        moe = model.model.layers[1].mlp
        prefix = "model.layers.1.block_sparse_moe."
        cols = slice(rank * width, (rank + 1) * width)
        torch.testing.assert_close(moe.gate.weight, stored[prefix + "gate.weight"])
        for e in range(cfg.num_experts):
            torch.testing.assert_close(moe.experts.gate_up[e, :width], stored[f"{prefix}experts.{e}.w1.weight"][cols])
            torch.testing.assert_close(moe.experts.gate_up[e, width:], stored[f"{prefix}experts.{e}.w3.weight"][cols])
            torch.testing.assert_close(moe.experts.down[e], stored[f"{prefix}experts.{e}.w2.weight"][:, cols])


def test_a_size_that_does_not_divide_the_heads_is_refused_before_starting(tmp_path):
    make_checkpoint("llama", tmp_path)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide 4 attention heads"):
        make_llm(tmp_path, tensor_parallel_size=3)


# ---- failures: a torchrun-style launch in which rank 1 is made to fail --------------------------

def _torchrun_rank(rank: int, port: int, path: str, fault: str, results) -> None:
    """One process of a 2-rank launch (as torchrun would start it); rank 1 gets a fault. As under
    torchrun, the rendezvous store is the launcher's (the test's), so no port is guessed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    from vattention.engine import runner as runner_module
    from vattention.kv import vattention as kv_vattention
    if rank == 1 and fault == "forward":
        real_forward = runner_module.ModelRunner.forward
        calls = []

        def failing_forward(self, inputs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected fault in rank 1's forward")
            return real_forward(self, inputs)
        runner_module.ModelRunner.forward = failing_forward
    if rank == 1 and fault == "memory":
        real_allocate = kv_vattention.VAttentionKVManager.allocate

        def short_allocate(self, request_id, num_tokens, hit=None):
            return num_tokens < 30 and real_allocate(self, request_id, num_tokens, hit)
        kv_vattention.VAttentionKVManager.allocate = short_allocate
    try:
        outs = make_llm(path, tensor_parallel_size=2).generate(PROMPTS, GREEDY)
        results.put((rank, "ok", len(outs)))
    except TensorParallelError as e:
        results.put((rank, "TensorParallelError", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
        results.put((rank, type(e).__name__, str(e)))


@pytest.mark.parametrize("fault,message", [
    ("forward", "rank 1: RuntimeError: injected fault in rank 1's forward"),
    ("memory", "could not be allocated here, unlike on rank 0"),
])
def test_a_failing_rank_stops_the_engine_with_a_clear_error(tmp_path, fault, message):
    """Rank 1 fails mid-step (an exception in its forward, or a KV allocation that rank 0 made
    and it cannot): rank 0 raises TensorParallelError quoting rank 1's error; nobody hangs."""
    make_checkpoint("llama", tmp_path)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=HANG_GUARD_S))  # port 0: the OS picks a free one
    procs = [ctx.Process(target=_torchrun_rank, args=(r, store.port, str(tmp_path), fault, results))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + HANG_GUARD_S - 10
    reports = {}
    # the reports before joining: a process that put one exits only once it is flushed to the pipe
    while len(reports) < 2 and time.monotonic() < deadline:
        try:
            rank, kind, text = results.get(timeout=1.0)
            reports[rank] = (kind, text)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"a rank hung; reports: {reports}"
    assert set(reports) == {0, 1}, f"a rank ended without a report: {reports}"
    kind, text = reports[0]
    assert kind == "TensorParallelError", reports
    assert message in text, text
    assert reports[1][0] != "ok", "rank 1 should have failed"


def test_a_killed_worker_stops_the_engine_with_a_clear_error(tmp_path):
    """Workers the engine started itself: SIGKILL rank 1 between steps; the next step raises an
    error naming rank 1 and the signal, and so does every step after it."""
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path, tensor_parallel_size=2)
    try:
        engine = llm.engine
        for prompt in PROMPTS:
            engine.add_request(prompt, GREEDY)
        engine.step()
        worker = engine.coordinator.workers.procs[1]
        worker.kill()
        worker.join()
        for _ in range(2):
            with pytest.raises(TensorParallelError, match=re.escape(KILLED)):
                engine.step()
    finally:
        llm.close()


# ---- reading a worker's exit: only once its process is reaped, and never waiting unbounded ------

NO_ERRORS = SimpleNamespace(compute=None, errors=lambda wait_s: {})  # a group no rank reported to


def test_a_killed_worker_is_named_by_its_signal_even_when_reaped_late():
    """The window behind "rank 1 exited with code None": another thread (a Process.join) has
    reaped the killed worker but not yet stored its exit code. Rank 0's error waits for the code
    and names the signal."""
    workers = WorkerProcesses(time.sleep, lambda rank: (600,), 2)
    coordinator = Coordinator(NO_ERRORS, None, workers)
    worker = workers.procs[1]
    try:
        os.kill(worker.pid, signal.SIGKILL)
        _, status = os.waitpid(worker.pid, 0)  # what Popen.poll does; it stores the code after
        code = os.waitstatus_to_exitcode(status)
        threading.Timer(0.5, setattr, (worker._popen, "returncode", code)).start()
        message = str(coordinator.fail(None))
    finally:
        workers.stop(timeout_s=5.0)
    assert KILLED in message and "None" not in message, message


def test_a_worker_that_ends_but_does_not_exit_is_reported_within_the_bound():
    """A worker whose end is noticed (its sentinel pipe closed) but whose process does not exit,
    as one stuck in its teardown: the failure callback fires at once, the report says it stopped
    responding after the bound, and stop() kills it instead of waiting forever."""
    stuck = "import os, time; os.closerange(3, os.sysconf('SC_OPEN_MAX')); time.sleep(600)"
    noticed = threading.Event()
    workers = WorkerProcesses(os.execv, lambda rank: (sys.executable, [sys.executable, "-c", stuck]), 2)
    workers.on_failure(noticed.set)
    worker = workers.procs[1]
    try:
        assert noticed.wait(60), "the watcher did not report the worker's end"
        assert [str(e) for e in workers.exits(wait_s=0.5)] == [
            "rank 1 stopped responding (its process has not exited after 0.5 s)"]
        assert worker.is_alive()
    finally:
        start = time.monotonic()
        workers.stop(timeout_s=0.5)
        stop_s = time.monotonic() - start
    assert worker.exitcode == -signal.SIGKILL.value, worker.exitcode
    assert stop_s < 10, f"stop() took {stop_s:.1f} s for a worker it had to kill"
