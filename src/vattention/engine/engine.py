"""LLMEngine: requests in, tokens out, one step at a time.

    add_request ─> Scheduler.waiting
    step():  Scheduler.schedule ─> ModelRunner.execute ─> OutputProcessor.append ─> RequestOutput
The engine owns the model, tokenizer, KV manager, scheduler and runner; nothing below it
imports it. With tensor_parallel_size > 1 this process is rank 0: build_rank loads its shard and
tp.py sends each step to the other ranks, which hold the other shards (tp.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import make_backend
from ..config import EngineConfig
from ..distributed import TPGroup
from ..memory import KVCacheSpec
from ..models.loader import load_model, read_generation_defaults, read_generation_eos, resolve_arch_config
from ..models.presets import PRESETS
from ..models.sharding import Shard
from ..outputs import RequestOutput
from ..sampling import Sampler
from ..sampling_params import SamplingParams
from .graphs import DecodeGraphs, use_graphs
from ..kv import make_kv_manager
from .output_processor import OutputProcessor, make_request_output
from .request import Request
from .runner import ModelRunner, StepResult
from .scheduler import Scheduler
from .stats import EngineStats, StepTiming
from .validation import RequestLimits
from .tp import Coordinator, RecordingKV, TensorParallelError, start_group

GIB = 1 << 30


@dataclass
class RankState:
    """What every tensor-parallel rank holds (all of it when there is one rank)."""

    device: torch.device
    dtype: torch.dtype
    model_path: str
    model: torch.nn.Module  # this rank's shard
    max_model_len: int  # context length: the model's, capped by its sliding window and the config
    runner: ModelRunner  # with this rank's KV manager (runner.kv) and attention backend


def build_rank(config: EngineConfig, group: TPGroup | None) -> RankState:
    """Load this rank's shard of the model and size its KV cache. Ranks agree on one KV budget
    (the smallest), so that the same requests fit on every rank."""
    mc, cc, sc = config.model, config.cache, config.scheduler
    device = _rank_device(mc, group)
    dtype = mc.torch_dtype(device)
    model_path = _resolve_model_path(mc.model)
    shard = group.shard if group is not None else Shard()
    model = load_model(model_path, mc.load_format, device, dtype, mc.dummy_seed, shard, group)
    arch = model.config
    limits = [arch.max_position_embeddings, arch.sliding_window, mc.max_model_len]
    max_model_len = min(x for x in limits if x)
    spec = KVCacheSpec(num_layers=arch.num_layers, num_kv_heads=shard.num_kv_heads(arch),
                       head_dim=arch.head_dim, dtype=dtype, max_seqs=sc.max_num_seqs,
                       max_seq_len=max_model_len, layout=cc.layout)
    budget = _kv_budget(cc, device)
    if group is not None:
        budget = group.min(budget)
    kv = make_kv_manager(cc.kv_cache, spec, device, budget, cc.page_size, cc.eager_cushion_groups,
                         cc.block_size)
    backend = make_backend(cc.attention_backend, kv.kind, arch.head_dim, device, cc.block_size)
    runner = ModelRunner(model, kv, backend, Sampler(), device, sc.max_num_batched_tokens)
    if use_graphs(mc.enforce_eager, device, backend.name, shard.world_size):
        runner.graphs = DecodeGraphs(model, kv, backend, device, min(mc.max_graph_batch_size, sc.max_num_seqs),
                                     max_model_len)
    return RankState(device, dtype, model_path, model, max_model_len, runner)


def _rank_device(mc, group: TPGroup | None) -> torch.device:
    device = mc.torch_device()
    if group is None or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"device {mc.device} names one GPU, but tensor parallelism puts rank r on "
                         f"GPU r of its machine; use --device cuda")
    return torch.device("cuda", group.local_rank)


def _kv_budget(cc, device: torch.device) -> int:
    if cc.kv_cache_memory_gib is not None:
        return int(cc.kv_cache_memory_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9) - GIB  # leave room for activations and the allocator
    return 4 * GIB


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        sc = config.scheduler
        self.coordinator: Coordinator | None = None  # tensor parallel: rank 0's link to the others
        group = workers = None
        if config.parallel.tensor_parallel_size > 1:
            arch = resolve_arch_config(_resolve_model_path(config.model.model))
            Shard(0, config.parallel.tensor_parallel_size).check(arch)  # before starting any process
            group, workers = start_group(config)
        try:
            rank = build_rank(config, group)
        except Exception as e:
            if group is None:
                raise
            coordinator = Coordinator(group, None, workers)
            error = coordinator.fail(e)
            coordinator.close()
            raise error from e
        self.device, self.dtype, self.model_path = rank.device, rank.dtype, rank.model_path
        self.model, self.max_model_len, self.runner = rank.model, rank.max_model_len, rank.runner
        self.kv = self.runner.kv
        if group is not None:
            self.kv = self.runner.kv = RecordingKV(self.kv)
            self.coordinator = Coordinator(group, self.kv, workers)
            self.runner.before_forward = self.coordinator.send
        arch = self.model.config
        self.tokenizer = _load_tokenizer(self.model_path)
        self.eos_token_ids = set(arch.eos_token_ids) | read_generation_eos(Path(self.model_path))
        if self.tokenizer is not None:
            self.eos_token_ids |= self.tokenizer.eos_token_ids
        # what a request leaves unset: the model's sampling defaults (or SamplingParams' own)
        self.default_sampling = (read_generation_defaults(Path(self.model_path))
                                 if config.model.generation_config == "auto" else {})
        self.scheduler = Scheduler(self.kv, sc.max_num_seqs, sc.max_num_batched_tokens)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.max_request_tokens = min(self.max_model_len, self.kv.max_tokens_per_request)
        self.limits = RequestLimits(self.max_model_len, self.max_request_tokens, arch.vocab_size,
                                    self.tokenizer.max_chars_per_token if self.tokenizer is not None else None)
        self.last_step: StepTiming | None = None
        self._groups: dict[str, list[Request]] = {}  # request id -> its n samples
        self._ids = itertools.count()
        self.peak_bytes_used = 0  # most KV bytes holding tokens after any step
        self.peak_bytes_committed = 0  # most KV bytes mapped/allocated/reserved after any step
        self.last_step_shape = (0, 0)  # (sequences, tokens) the last step computed

    # ---- requests ---------------------------------------------------------------------------

    def default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams from what the caller gave, the model's defaults for the rest."""
        return SamplingParams(**{**self.default_sampling, **given})

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its id. Bad input raises ValueError and
        leaves the engine and other requests untouched."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids, text = self._tokenize(prompt)
        self.limits.check_prompt(prompt_ids)
        self.limits.check_params(params)
        room = self.limits.room(len(prompt_ids))
        max_tokens = min(params.max_tokens or room, room)
        group = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            req = Request(f"{request_id}#{i}", prompt_ids, params, self.eos_token_ids, max_tokens,
                          prompt=text, sample_index=i, generator=gen)
            group.append(req)
        for req in group:
            self.scheduler.add(req)
        self._groups[request_id] = group
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids")
            self.limits.check_text_length(len(prompt))
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = list(prompt), None
        return ids, text

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV memory."""
        for req in self._groups.pop(request_id, []):
            if not req.finished:
                self.scheduler.finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """The engine's state now: queue lengths, KV memory, the latest step's timing."""
        s = self.scheduler
        running = s.running
        return EngineStats(num_running=len(running), num_waiting=len(s.waiting),
                           num_decoding=sum(r.num_computed_tokens >= len(r.prompt_token_ids) for r in running),
                           num_context_tokens=sum(r.num_computed_tokens for r in running),
                           num_preemptions=s.num_preemptions, kv=self.kv.usage(), last_step=self.last_step)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the current state of every request group that progressed.

        An error that belongs to one request (its KV allocation, its sampling, its output
        processing) finishes only that request, with finish_reason "error" and the reason in its
        output's `error`; the others go on. An error of the step as a whole (the forward pass)
        raises, and the requests stay queued for the caller to abort or retry."""
        sched = self.scheduler.schedule()
        self.last_step_shape = (len(sched.scheduled), sched.num_batched_tokens)
        try:
            result = self.runner.execute(sched) if sched.scheduled else StepResult({}, {})
        except TensorParallelError:
            raise
        except Exception as e:
            if self.coordinator is None:
                raise
            raise self.coordinator.fail(e) from e  # a collective broke: say which rank failed and why
        touched: dict[str, list[Request]] = {}
        for req in sched.failed:
            self._touch(req, touched)
        for item in sched.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            error = result.failed.get(req.request_id)
            token = result.sampled.get(req.request_id)
            if error is None and token is None:
                continue
            if error is None:
                try:
                    reason = self.outputs.append(req, token)
                except Exception as e:  # noqa: BLE001 - e.g. detokenizing: this request's alone
                    error = f"processing its output failed: {type(e).__name__}: {e}"
                else:
                    if reason is not None:
                        self.scheduler.finish(req, reason)
            if error is not None:
                self.scheduler.fail(req, error)
            self._touch(req, touched)
        usage = self.kv.usage()
        self.peak_bytes_used = max(self.peak_bytes_used, usage.bytes_used)
        self.peak_bytes_committed = max(self.peak_bytes_committed, usage.bytes_committed)
        results = [make_request_output(group) for group in touched.values()]
        for result in results:
            if result.finished:
                del self._groups[result.request_id]
        return results

    def _touch(self, req: Request, touched: dict[str, list[Request]]) -> None:
        group_id = req.request_id.rsplit("#", 1)[0]
        if group_id in self._groups:
            touched[group_id] = self._groups[group_id]

    def memory_summary(self) -> str:
        """One line: peak KV bytes holding tokens vs committed to hold them."""
        mib = 1 << 20
        cc = self.config.cache
        design = cc.kv_cache + (f", {cc.layout}" if cc.kv_cache == "vattention" else "")
        util = self.peak_bytes_used / self.peak_bytes_committed if self.peak_bytes_committed else 1.0
        line = (f"KV cache ({design}): peak {self.peak_bytes_used / mib:.2f} MiB used / "
                f"{self.peak_bytes_committed / mib:.2f} MiB mapped ({util:.0%})")
        tp = self.config.parallel.tensor_parallel_size
        if tp > 1:
            line += f" on rank 0 of {tp} (each rank holds its own KV heads)"
        counters = self.kv.usage().counters
        if "pages_mapped_background" in counters:
            line += (f"; pages mapped {counters['pages_mapped_background']} in background, "
                     f"{counters['pages_mapped_critical']} on the critical path")
        return line

    def close(self) -> None:
        self.kv.close()
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None


def _resolve_model_path(model: str | None) -> str:
    if model is None:
        from ..models.gguf_import import default_model_dir
        return str(default_model_dir())
    return model


def _load_tokenizer(model_path: str):
    if model_path in PRESETS or not (Path(model_path) / "tokenizer.json").is_file():
        return None
    from ..models.tokenizer import Tokenizer
    return Tokenizer.from_dir(model_path)
