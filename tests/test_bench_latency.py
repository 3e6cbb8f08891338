"""`vattention bench latency` end to end on a tiny dummy model on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vattention.cli import main as cli_main
from vattention.engine import LLM
from vattention.sampling_params import SamplingParams

TIED = {"architectures": ["LlamaForCausalLM"], "vocab_size": 500, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}


@pytest.fixture
def one_thread():
    """Tiny matmuls: with two threads OpenMP barriers dominate, and stall when the cores are shared."""
    num = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num)


def _hand_weight_bytes(c: dict) -> int:
    """fp32 parameters of TIED, counted by hand: the tied lm_head is the embedding."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q = o = h * c["num_attention_heads"] * d
    k = v = h * c["num_key_value_heads"] * d
    layer = q + k + v + o + 3 * h * i + 2 * h  # attention, gate/up/down, two RMSNorms
    return 4 * (c["vocab_size"] * h + c["num_hidden_layers"] * layer + h)


def _steps_report_timing(model: Path) -> bool:
    """Whether this engine sets engine.last_step after a step (its host time is then reported)."""
    llm = LLM(model=str(model), load_format="dummy", device="cpu", dtype="float32", max_model_len=64,
              kv_cache_memory_gib=0.01)
    try:
        llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=1))
        llm.engine.step()
        return llm.engine.last_step is not None
    finally:
        llm.close()


def test_latency_reports_every_design_and_batch_against_the_roofline(tmp_path: Path, one_thread, capsys):
    """Each design x batch has decode-only wall times (back to back and synchronized) of exactly B
    sequences, a host time once the engine reports its steps, a roofline from the hand-counted
    weight bytes plus B x context x bytes/token, and a share of it in (0, 1.5]; a batch above
    --max-num-seqs is skipped with a note."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TIED))
    out = tmp_path / "lat.json"
    steps_report_timing = _steps_report_timing(model)
    argv = ["bench", "latency", "--model", str(model), "--load-format", "dummy", "--device", "cpu",
            "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-gib", "0.01",
            "--kv-caches", "vattention,paged:sdpa", "--batch-sizes", "1,2,4", "--max-num-seqs", "2",
            "--input-len", "16", "--decode-steps", "3", "--warmup-steps", "1", "--copy-mib", "16",
            "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(line for line in printed if line.lstrip().startswith("design  batch"))
    assert header.split() == ["design", "batch", "context", "wall", "synced", "host", "GPU", "busy", "wall/busy",
                              "roofline", "of", "busy", "of", "wall"]
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    bandwidth = res["copy_bandwidth_GBps"] * 1e9
    assert bandwidth > 0
    bytes_per_token = 2 * 2 * 2 * 8 * 4  # layers x (K, V) x kv heads x head dim x fp32
    for d in res["designs"]:
        assert d["weight_bytes"] == _hand_weight_bytes(TIED), d
        assert d["kv_bytes_per_token"] == bytes_per_token and d["attention_backend_used"] == "sdpa"
        assert d["start_s"] > 0 and not d["cuda_graphs"]
    runs = {(r["design"], r["batch_size"]): r for r in res["runs"]}
    assert set(runs) == {(d, b) for d in ("vattention", "paged sdpa") for b in (1, 2, 4)}
    for (design, batch), r in runs.items():
        if batch == 4:
            assert "max-num-seqs" in r["skipped"], r
            continue
        assert r["decode_batch"] == r["decode_tokens"] == batch, r
        assert r["num_timed_steps"] == 3 and r["wall_ms"] > 0 and r["wall_ms_synced"] > 0, r
        assert r["gpu_busy_ms"] is None and r["wall_vs_gpu_busy"] is None  # no profile on CPU
        if steps_report_timing:
            assert r["host_ms"] > 0, r
        else:
            assert r["host_ms"] is None, r
        # 16 prompt tokens, its first output, one warm-up step: the timed steps read 18, 19, 20
        assert r["context_len"] == 19
        assert r["kv_bytes_read"] == batch * 19 * bytes_per_token
        want = 1e3 * (_hand_weight_bytes(TIED) + r["kv_bytes_read"]) / bandwidth
        assert r["roofline_ms"] == pytest.approx(want, rel=1e-9)
        assert 0 < r["roofline_vs_wall"] <= 1.5, r
