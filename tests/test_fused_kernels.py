"""The fused Triton kernels (vattention.models.fused_kernels) against the eager functions the model
uses elsewhere (vattention.models.fused) and a float64 reference, and the whole fused model with
the kernels against the unfused reference model.

On CPU the kernels run under Triton's interpreter (small shapes); with VATTENTION_TEST_DEVICE=cuda
they are compiled for the GPU. Errors are max |out - ref| / max |ref| over the tensor.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

on_cuda = os.environ.get("VATTENTION_TEST_DEVICE", "cpu").startswith("cuda")
if on_cuda and not torch.cuda.is_available():
    pytest.skip("VATTENTION_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton; its interpreter runs these tests on "
                "CPU)", allow_module_level=True)
DEVICE = "cuda" if on_cuda else "cpu"
KERNELS = "vattention.models.fused_kernels"


def _import_kernels():
    """As in test_triton_kernels.py: TRITON_INTERPRET=1 must be set before triton is first
    imported, and stays set for this process. If triton was imported earlier without it, skip."""
    if on_cuda:
        return importlib.import_module(KERNELS)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; run "
                    "this file on its own or with TRITON_INTERPRET=1 set", allow_module_level=True)
    module = importlib.import_module(KERNELS)
    return module if module._INTERPRETED else importlib.reload(module)


fk = _import_kernels()

from vattention.models import fused  # noqa: E402  (after triton's mode is settled)

from engine_helpers import make_checkpoint  # noqa: E402
from unfused_llama import greedy, load_unfused  # noqa: E402

# Kernel or eager vs float64: the output's rounding to its dtype, a few times over (bf16 2^-8,
# fp16 2^-11 relative); the interpreter casts float32 to bf16 by truncation, a bit more.
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-6}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def kernels_run_here():
    """Skip (with the reason) where Triton cannot run: no GPU and a broken interpreter."""
    x = torch.randn(2, 16, device=DEVICE)
    try:
        fk.rms_norm(x, torch.ones(16, device=DEVICE), 1e-6)
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain means "cannot test here"
        pytest.skip(f"Triton cannot run on {DEVICE} here ({type(e).__name__}: {e})")


def rand(*shape, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """max |out - ref| / max |ref| <= tol; the message names the worst element."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, want {tuple(ref.shape)}"
    err = (out.double() - ref.double()).abs()
    rel = (err.max() / ref.double().abs().max().clamp_min(1e-12)).item()
    if rel > tol:
        i = tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{what}: relative error {rel:.2e} > {tol:.1e}; worst at {list(i)}: "
                             f"got {out[i].item():.6g}, want {ref[i].item():.6g}")


# ---- RMSNorm, with and without the residual add ------------------------------------------------

def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 100])  # a power of 2, and a masked tail
def test_rms_norm_matches_eager_and_float64(dtype, hidden):
    """weight * x / rms(x): kernel = eager = float64 reference, to the dtype's rounding."""
    torch.manual_seed(hidden)
    x, weight = rand(5, hidden, dtype=dtype, scale=3.0), rand(hidden, dtype=dtype) + 1
    out = fk.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype
    eager = fused.rms_norm(x.cpu(), weight.cpu(), 1e-5)
    assert_close(out.cpu(), eager, TOLERANCE[dtype], f"kernel vs eager {dtype}")
    assert_close(out, rms_norm_float64(x, weight, 1e-5), TOLERANCE[dtype], f"kernel vs float64 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["alone", "with-residual"])
def test_gemma_rms_norm_matches_eager_and_float64(dtype, residual):
    """Gemma's (1 + w) * x / rms(x), float32 throughout: kernel = eager = float64 reference;
    with a residual, the sum is written in place first, as in the Llama norm."""
    torch.manual_seed(2)
    x, weight = rand(5, 100, dtype=dtype, scale=3.0), rand(100, dtype=dtype, scale=0.3)
    res = rand(5, 100, dtype=dtype) if residual else None
    eager_res = res.cpu().clone() if residual else None
    out = fk.rms_norm(x, weight, 1e-6, residual=res, gemma=True)
    eager = fused.gemma_rms_norm(x.cpu(), weight.cpu(), 1e-6, eager_res)
    assert_close(out.cpu(), eager, TOLERANCE[dtype], f"kernel vs eager {dtype}")
    stream = res if residual else x
    if residual:
        assert_close(res.cpu(), eager_res, TOLERANCE[dtype], f"residual kernel vs eager {dtype}")
    assert_close(out, rms_norm_float64(stream, weight.double() + 1, 1e-6), TOLERANCE[dtype],
                 f"kernel vs float64 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_adds_in_place_and_normalizes_the_sum(dtype):
    """residual += x in place (rounded to the dtype, as torch's add), then the sum normalized:
    kernel = eager = float64 reference, on a strided x (rows of a wider buffer)."""
    torch.manual_seed(1)
    x = rand(6, 96, dtype=dtype)[:, :48]  # row stride 96
    residual, weight = rand(6, 48, dtype=dtype), rand(48, dtype=dtype)
    eager_residual = residual.cpu().clone()
    want_sum = residual.double() + x.double()
    out = fk.rms_norm(x, weight, 1e-6, residual=residual)
    eager_out, eager_res = fused.add_rms_norm(x.cpu(), eager_residual, weight.cpu(), 1e-6)
    assert eager_res is eager_residual, "the eager path, too, adds into the residual"
    assert_close(residual, want_sum, TOLERANCE[dtype], f"residual sum {dtype}")
    assert_close(residual.cpu(), eager_residual, TOLERANCE[dtype], f"residual kernel vs eager {dtype}")
    assert_close(out.cpu(), eager_out, TOLERANCE[dtype], f"kernel vs eager {dtype}")
    assert_close(out, rms_norm_float64(residual, weight, 1e-6), TOLERANCE[dtype], f"kernel vs float64 {dtype}")


# ---- RoPE on q and k ---------------------------------------------------------------------------

def rope_float64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The rotation by the float32 angle positions * inv_freq (what eager computes), in float64."""
    angle = (positions.float()[:, None] * inv_freq[None, :]).double()[:, None, :]  # [T, 1, D/2]
    x = x.double()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)


ROPE_SHAPES = [(4, 2, 16), (8, 1, 64), (6, 6, 32), (20, 4, 128), (3, 1, 24)]  # H_q, H_kv, D


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", ROPE_SHAPES, ids=str)
def test_rotary_matches_eager_and_float64(dtype, num_q_heads, num_kv_heads, head_dim):
    """q and k rotated in one kernel from views of one qkv projection, positions up to 30000:
    float32 within 1e-6 of eager, every dtype within its rounding of the float64 rotation."""
    torch.manual_seed(head_dim + num_q_heads)
    t = 7
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = rand(t, width, dtype=dtype)
    q = qkv[:, :num_q_heads * head_dim].view(t, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 17, 1000, 8191, 30000], device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=DEVICE) / head_dim))
    q_out, k_out = fk.rotary_qk(q, k, positions, inv_freq)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == dtype
    q_eager, k_eager = fused.rotary_qk(q.cpu(), k.cpu(), positions.cpu(), inv_freq.cpu())
    for name, out, eager, x in (("q", q_out, q_eager, q), ("k", k_out, k_eager, k)):
        if dtype == torch.float32:
            diff = (out.cpu() - eager).abs().max().item()
            assert diff <= 1e-6, f"{name}: float32 kernel differs from eager by {diff:.2e}"
        else:
            assert_close(out.cpu(), eager, TOLERANCE[dtype], f"{name} kernel vs eager {dtype}")
        assert_close(out, rope_float64(x, positions, inv_freq), TOLERANCE[dtype], f"{name} vs float64 {dtype}")
        assert_close(eager, rope_float64(x, positions, inv_freq).cpu(), TOLERANCE[dtype], f"{name} eager vs float64")


@pytest.mark.parametrize("cache_dtype", [None, torch.float32], ids=["same-dtype", "float32-cache"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", ROPE_SHAPES[:3] + ROPE_SHAPES[4:], ids=str)
def test_rotary_store_writes_the_cache_rows_as_eager(dtype, num_q_heads, num_kv_heads, head_dim, cache_dtype):
    """With store=, the same kernel also writes rope(k) and v to the given cache rows (scattered,
    not in token order, through a strided cross-layer-like view) and touches no other row:
    bit-equal to the eager rotary_qk_store."""
    torch.manual_seed(head_dim * 3 + num_kv_heads)
    t, rows_total = 5, 40
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = rand(t, width, dtype=dtype)
    q = qkv[:, :num_q_heads * head_dim].view(t, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(t, num_kv_heads, head_dim)
    # one buffer [rows, 2 (k|v), H_kv, D]: the k and v caches are strided views, as cross_layer's
    cache = rand(rows_total, 2, num_kv_heads, head_dim, dtype=cache_dtype or dtype)
    rows = torch.tensor([31, 2, 17, 0, 39], device=DEVICE)
    positions = torch.tensor([4, 900, 3, 77, 12000], device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=DEVICE) / head_dim))
    want_cache = cache.cpu().clone()
    q_eager, k_eager = fused.rotary_qk_store(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), inv_freq.cpu(),
                                             want_cache[:, 0], want_cache[:, 1], rows.cpu())
    q_out, k_out = fk.rotary_qk(q, k, positions, inv_freq, store=(v, cache[:, 0], cache[:, 1], rows))
    q_plain, k_plain = fk.rotary_qk(q, k, positions, inv_freq)
    assert torch.equal(q_out, q_plain) and torch.equal(k_out, k_plain)
    untouched = [r for r in range(rows_total) if r not in rows.tolist()]
    assert torch.equal(cache.cpu()[untouched], want_cache[untouched])
    assert torch.equal(cache.cpu()[rows.cpu(), 1], v.cpu().to(cache.dtype))
    assert torch.equal(cache.cpu()[rows.cpu(), 0], k_out.cpu().to(cache.dtype))
    if dtype == torch.float32:
        assert (cache.cpu() - want_cache).abs().max().item() <= 1e-6
        assert (q_out.cpu() - q_eager).abs().max().item() <= 1e-6
    else:
        assert_close(cache.cpu()[rows.cpu(), 0], want_cache[rows.cpu(), 0], TOLERANCE[dtype], "k cache vs eager")


# ---- SiLU(gate) * up ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [64, 1500])  # one block, and several with a masked tail
def test_silu_and_mul_matches_eager_and_float64(dtype, width):
    torch.manual_seed(width)
    gate_up = rand(3, 2 * width, dtype=dtype, scale=4.0)
    out = fk.silu_and_mul(gate_up)
    eager = fused.silu_and_mul(gate_up.cpu())
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert_close(out.cpu(), eager, TOLERANCE[dtype], f"kernel vs eager {dtype}")
    assert_close(out, gate * torch.sigmoid(gate) * up, TOLERANCE[dtype], f"kernel vs float64 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_tanh_and_mul_matches_eager_and_float64(dtype):
    """Gemma's GeGLU through the same kernel: gelu_tanh(gate) * up."""
    torch.manual_seed(3)
    gate_up = rand(3, 2 * 1500, dtype=dtype, scale=4.0)
    out = fk.silu_and_mul(gate_up, gelu=True)
    eager = fused.gelu_tanh_and_mul(gate_up.cpu())
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate ** 3))) * up
    assert_close(out.cpu(), eager, TOLERANCE[dtype], f"kernel vs eager {dtype}")
    assert_close(out, want, TOLERANCE[dtype], f"kernel vs float64 {dtype}")


# ---- the skinny GEMM (projections at decode batch sizes) ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,split_k,block_k", [
    (1, 64, 256, 1, 128),  # one row, whole tiles
    (5, 72, 200, 1, 64),  # masked rows, columns and K tail
    (16, 40, 384, 3, 64),  # a full row block, K split over three programs
    (3, 33, 96, 4, 16),  # more splits than needed: empty ones are dropped
])
def test_skinny_linear_matches_float64(dtype, m, n, k, split_k, block_k):
    torch.manual_seed(m * n + k)
    x = rand(m, k, dtype=dtype, scale=2.0)
    w = rand(n, k, dtype=dtype, scale=0.1)
    out = fk.skinny_linear(x, w, block_n=16, block_k=block_k, split_k=split_k, num_stages=1)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = x.double() @ w.double().T
    assert_close(out, ref, TOLERANCE[dtype], f"skinny vs float64 {dtype}")
    eager = F.linear(x.cpu().float(), w.cpu().float()).to(dtype)
    assert_close(out.cpu(), eager, TOLERANCE[dtype], f"skinny vs eager {dtype}")


def test_linear_dispatch_keeps_cpu_and_large_batches_on_f_linear():
    """On CPU fused.linear is F.linear, bit for bit; the skinny path is CUDA's, for 16-bit decode
    batches without a bias and up to SKINNY_MAX_ROWS rows."""
    x, w, b = torch.randn(3, 32), torch.randn(24, 32), torch.randn(24)
    assert torch.equal(fused.linear(x, w), F.linear(x, w))
    assert torch.equal(fused.linear(x, w, b), F.linear(x, w, b))
    big = torch.randn(fused.SKINNY_MAX_ROWS + 1, 32, dtype=torch.bfloat16)
    assert fused._skinny_kernels(big, w.bfloat16()) is None


@pytest.mark.parametrize("call,match", [
    (lambda: fk.rms_norm(rand(2, 8, dtype=torch.float16), rand(8, dtype=torch.float32), 1e-6), "weight must be"),
    (lambda: fk.rms_norm(rand(2, 8, dtype=torch.float16)[:, ::2], rand(4, dtype=torch.float16), 1e-6),
     "contiguous along its last dim"),
    (lambda: fk.rotary_qk(rand(2, 4, 16, dtype=torch.float16), rand(2, 2, 16, dtype=torch.float16),
                          torch.zeros(2, device=DEVICE), torch.ones(8, device=DEVICE)), "positions must be"),
    (lambda: fk.rotary_qk(rand(2, 4, 16, dtype=torch.float16), rand(2, 2, 16, dtype=torch.float16),
                          torch.zeros(2, dtype=torch.long, device=DEVICE), torch.ones(16, device=DEVICE)),
     r"inv_freq must be float32 \[8\]"),
    (lambda: fk.silu_and_mul(rand(2, 7, dtype=torch.float16)), "even number of columns"),
    (lambda: fk.skinny_linear(rand(65, 16, dtype=torch.float16), rand(8, 16, dtype=torch.float16)), "1..64 rows"),
    (lambda: fk.skinny_linear(rand(2, 16, dtype=torch.float16), rand(8, 12, dtype=torch.float16)),
     r"weight must be \[N, 16\]"),
    (lambda: fk.skinny_linear(rand(2, 16, dtype=torch.float16), rand(8, 16, dtype=torch.float16), block_k=24),
     "bad tiling"),
    (lambda: fk.rotary_qk(rand(2, 4, 16, dtype=torch.float16), rand(2, 2, 16, dtype=torch.float16),
                          torch.zeros(2, dtype=torch.long, device=DEVICE), torch.ones(8, device=DEVICE),
                          store=(rand(2, 2, 16, dtype=torch.float16), rand(9, 4, 16, dtype=torch.float16),
                                 rand(9, 4, 16, dtype=torch.float16), torch.zeros(2, dtype=torch.long, device=DEVICE))),
     r"k_cache must be \[rows, 2, 16\]"),
    (lambda: fk.rotary_qk(rand(2, 4, 16, dtype=torch.float16), rand(2, 2, 16, dtype=torch.float16),
                          torch.zeros(2, dtype=torch.long, device=DEVICE), torch.ones(8, device=DEVICE),
                          store=(rand(2, 2, 16, dtype=torch.float16), rand(9, 2, 16, dtype=torch.float16),
                                 rand(9, 2, 16, dtype=torch.float16), torch.zeros(3, dtype=torch.long, device=DEVICE))),
     r"rows must be int32/int64 \[2\]"),
], ids=["weight-dtype", "strided-last-dim", "float-positions", "inv-freq-shape", "odd-gate-up",
        "skinny-rows", "skinny-weight", "skinny-tiling", "store-cache-heads", "store-rows-shape"])
def test_unsupported_inputs_raise_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- the model through the kernels -------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_through_the_kernels_gives_the_unfused_greedy_tokens(tmp_path, monkeypatch, family):
    """float32: the fused model with every elementwise op in a Triton kernel (interpreted on CPU),
    and every bias-free projection of up to 16 rows (all of these prompts' decode steps) in the
    skinny GEMM, gives the unfused reference's greedy tokens, logprobs within 1e-4."""
    from vattention.models.loader import load_model
    make_checkpoint(family, tmp_path)
    monkeypatch.setattr(fused, "_kernels", lambda x: fk)
    monkeypatch.setattr(fused, "SKINNY_DTYPES", (torch.float32,))  # CUDA takes only 16-bit ones
    calls = []
    monkeypatch.setattr(fk, "skinny_linear", lambda *a, _f=fk.skinny_linear, **kw: calls.append(kw) or _f(*a, **kw))
    model = load_model(tmp_path, "safetensors", torch.device(DEVICE), torch.float32)
    prompts = [[5, 9, 13], list(range(20, 33)), [7]]
    got_tokens, got_logprobs = greedy(model, prompts, 4)
    want_tokens, want_logprobs = greedy(load_unfused(tmp_path, DEVICE, torch.float32), prompts, 4)
    assert got_tokens == want_tokens
    diff = max(abs(a - b) for x, y in zip(got_logprobs, want_logprobs) for a, b in zip(x, y))
    assert diff < 1e-4, f"logprobs differ by up to {diff:.2e}"
    assert len(calls) >= 3 * 4, "the skinny GEMM took no decode step's projections"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_through_the_kernels_gives_the_eager_greedy_tokens(tmp_path, monkeypatch, family):
    """float32: Gemma with its norms, GeGLU and rope in the Triton kernels (interpreted on CPU)
    gives the eager model's greedy tokens (which equal HF's: test_engine.py), logprobs within 1e-4."""
    from vattention.models.loader import load_model
    make_checkpoint(family, tmp_path)
    prompts = [[5, 9, 13], list(range(20, 33)), [7]]
    monkeypatch.setattr(fused, "_kernels", lambda x: None)  # eager, on CUDA too
    want_tokens, want_logprobs = greedy(load_model(tmp_path, "safetensors", torch.device(DEVICE), torch.float32),
                                        prompts, 4)
    monkeypatch.setattr(fused, "_kernels", lambda x: fk)
    model = load_model(tmp_path, "safetensors", torch.device(DEVICE), torch.float32)
    got_tokens, got_logprobs = greedy(model, prompts, 4)
    assert got_tokens == want_tokens
    diff = max(abs(a - b) for x, y in zip(got_logprobs, want_logprobs) for a, b in zip(x, y))
    assert diff < 1e-4, f"logprobs differ by up to {diff:.2e}"
