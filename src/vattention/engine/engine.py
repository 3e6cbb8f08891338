"""LLMEngine: requests in, tokens out, one step at a time.

    add_request ─> Scheduler.waiting
    step():  Scheduler.schedule ─> ModelRunner.launch (step N queued on the device)
             ─> collect step N-1: its sampled ids reach the host ─> Scheduler.update_from_output
             ─> ModelRunner.sample (step N's tokens chosen on the device, copy to host started)
             ─> RequestOutput of what changed

The overlap: the host schedules, builds and launches step N (mapping the pages it needs), then
collects step N-1 (detokenizing, applying stop rules) while the device runs step N; only then
does it queue step N's sampling, so that penalties see every earlier token and a request that
stopped at N-1 samples nothing. Step N's input ids of decoding requests are step N-1's sampled
ids, read on the device. With async_scheduling off, each step is collected before the next is
scheduled (tensor parallelism runs this way: the other ranks need every token id in the plan).

The engine owns the scheduler (request state), the runner (model, KV manager, attention backend)
and the tokenizer; nothing below it imports it. With tensor_parallel_size > 1 this process is
rank 0: rank.build_rank loads its shard and tp.py sends each step to the other ranks.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from ..config import EngineConfig
from ..models.loader import read_generation_defaults, read_generation_eos, resolve_arch_config
from ..models.presets import PRESETS
from ..models.sharding import Shard
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .output_processor import OutputProcessor, make_request_output
from .rank import build_rank, resolve_model_path
from .request import Request
from .runner import PendingSample
from .scheduler import Scheduler
from .stats import EngineStats, StepTiming
from .step_io import SchedulerOutput, StepResult
from .tp import Coordinator, RecordingKV, TensorParallelError, start_group
from .validation import RequestLimits


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        sc = config.scheduler
        chat_template = None
        if config.model.chat_template is not None:  # checked before anything starts
            from ..models.tokenizer import compile_chat_template
            chat_template = read_chat_template(config.model.chat_template)
            compile_chat_template(chat_template)
        self.coordinator: Coordinator | None = None  # tensor parallel: rank 0's link to the others
        group = workers = None
        if config.parallel.tensor_parallel_size > 1:
            arch = resolve_arch_config(resolve_model_path(config.model.model))
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
        if chat_template is not None:
            if self.tokenizer is None:
                self.close()
                raise ValueError("chat_template was given, but this model has no tokenizer to use it with")
            self.tokenizer.set_chat_template(chat_template)
        self.eos_token_ids = set(arch.eos_token_ids) | read_generation_eos(Path(self.model_path))
        if self.tokenizer is not None:
            self.eos_token_ids |= self.tokenizer.eos_token_ids
        # what a request leaves unset: the model's sampling defaults (or SamplingParams' own)
        self.default_sampling = (read_generation_defaults(Path(self.model_path))
                                 if config.model.generation_config == "auto" else {})
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.scheduler = Scheduler(self.kv, self.outputs, sc.max_num_seqs, sc.max_num_batched_tokens)
        self.async_scheduling = sc.async_scheduling and group is None
        self._inflight: tuple[SchedulerOutput, PendingSample] | None = None  # the step not yet collected
        self.max_request_tokens = min(self.max_model_len, self.kv.max_tokens_per_request)
        self.limits = RequestLimits(self.max_model_len, self.max_request_tokens, arch.vocab_size,
                                    self.tokenizer.max_chars_per_token if self.tokenizer is not None else None)
        self.last_step: StepTiming | None = None
        self._grammars = None  # structured outputs' compiler and cache, made on first use
        self._groups: dict[str, list[Request]] = {}  # request id -> its n samples
        self._ids = itertools.count()
        self.peak_bytes_used = 0  # most KV bytes holding tokens after any step
        self.peak_bytes_committed = 0  # most KV bytes mapped/allocated/reserved after any step
        self.peak_bytes_physical = 0  # most KV bytes the running requests' tokens take, shared prefixes once
        if config.model.warm_up == "on" or (config.model.warm_up == "auto" and self.device.type == "cuda"):
            try:
                self._warm_up()
            except BaseException:
                self.close()
                raise

    def _warm_up(self) -> None:
        """Run throwaway requests so the kernels compile now, not in a user's first requests
        (Triton specialises on shapes: one sequence or many, token counts that are multiples
        of 16 or not, a prefill over an earlier chunk or a cached prefix): a chunked prompt and
        three short ones at once, then the same again (prefix hits), a few decodes each. The
        engine forgets them: prefix cache, counters and peaks start from zero."""
        vocab, room = self.limits.vocab_size, self.max_request_tokens - 8
        lengths = [min(n, room) for n in (self.config.scheduler.max_num_batched_tokens + 37, 33, 64, 100)]
        for round_ in range(2):
            for i, n in enumerate(lengths):
                self.add_request([(7 * t + 3 + i) % vocab for t in range(n)],
                                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 request_id=f"warm-up-{round_}-{i}")
            while self.has_unfinished():
                self.step()
        self.kv.reset_prefix_cache()
        s = self.scheduler
        s.num_preemptions = s.prefix_queries = s.prefix_hits = s.num_prompt_tokens_computed = 0
        s.num_generated_tokens = 0
        self.peak_bytes_used = self.peak_bytes_committed = self.peak_bytes_physical = 0
        self.last_step = None

    # ---- requests ---------------------------------------------------------------------------

    def default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams from what the caller gave, the model's defaults for the rest."""
        return SamplingParams(**{**self.default_sampling, **given})

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its id. Bad input raises ValueError and
        leaves the engine and other requests untouched. Only requests with the same
        `cache_salt` (None included) share cached prefixes."""
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids, text = self._tokenize(prompt)
        self.limits.check_prompt(prompt_ids)
        self.limits.check_params(params)
        room = self.limits.room(len(prompt_ids))
        max_tokens = min(params.max_tokens or room, room)
        matchers = self._matchers(params)  # a schema that does not compile is this request's 400
        group = []
        for i in range(params.num_candidates):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            req = Request(f"{request_id}#{i}", prompt_ids, params, self.eos_token_ids, max_tokens,
                          prompt=text, sample_index=i, generator=gen, cache_salt=cache_salt,
                          matcher=matchers[i] if matchers else None)
            group.append(req)
        for req in group:
            self.scheduler.add(req)
        self._groups[request_id] = group
        return request_id

    def _matchers(self, params: SamplingParams) -> list | None:
        """One grammar matcher a sample, for structured outputs; ValueError when they cannot run."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer; this model has none")
        if self._grammars is None:
            from .structured import Grammars, xgrammar_missing
            missing = xgrammar_missing()
            if missing is not None:
                raise ValueError(missing)
            self._grammars = self.runner.grammars = Grammars(self.tokenizer, self.limits.vocab_size,
                                                             self.eos_token_ids)
        return [self._grammars.matcher(spec) for _ in range(params.num_candidates)]

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
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def attention_backend(self) -> str:
        """The attention backend's name (what `auto` chose)."""
        return self.runner.backend.name

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode-only steps replay CUDA graphs."""
        return self.runner.graphs is not None

    def stats(self) -> EngineStats:
        """The engine's state now: queue lengths, KV memory, the latest step's timing."""
        s = self.scheduler
        running = s.running
        return EngineStats(num_running=len(running), num_waiting=len(s.waiting),
                           num_decoding=sum(r.num_computed_tokens >= len(r.prompt_token_ids) for r in running),
                           num_context_tokens=sum(r.num_computed_tokens for r in running),
                           num_preemptions=s.num_preemptions, kv=self.kv.usage(), last_step=self.last_step,
                           prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
                           num_prompt_tokens_computed=s.num_prompt_tokens_computed,
                           num_generated_tokens=s.num_generated_tokens)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the new state of every request group that progressed (with
        async scheduling, the tokens of the step launched by the previous call).

        An error that belongs to one request (its KV allocation, its sampling, its output
        processing) finishes only that request, with finish_reason "error" and the reason in its
        output's `error`; the others go on. An error of the step as a whole (the forward pass)
        raises; the requests stay queued, to be recomputed, for the caller to abort or retry."""
        start = time.perf_counter()
        waited = 0.0
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched.scheduled else None
        touched = list(sched.failed)
        if self._inflight is not None:
            previous, pending = self._inflight
            self._inflight = None
            result, seconds = self._collect(previous, pending, sched)
            waited += seconds
            touched += self.scheduler.update_from_output(previous, result)
        if launched is not None:
            alive = [not item.request.finished for item in sched.scheduled]
            pending = self.runner.sample(launched, alive)
            if pending.errors:  # known at once: these must not be scheduled again
                for item in sched.scheduled:
                    error = pending.errors.get(item.request.request_id)
                    if error is not None:
                        self.scheduler.fail(item.request, error)
                        touched.append(item.request)
            if self.async_scheduling:
                self._inflight = (sched, pending)
            else:
                result, seconds = self._collect(sched, pending)
                waited += seconds
                touched += self.scheduler.update_from_output(sched, result)
        outputs = self._outputs(touched)
        self.last_step = StepTiming(len(sched.scheduled), sched.num_batched_tokens,
                                    time.perf_counter() - start - waited, waited)
        return outputs

    def _launch(self, sched: SchedulerOutput):
        try:
            return self.runner.launch(sched)
        except Exception as e:
            self._abandon(sched)
            if self.coordinator is None or isinstance(e, TensorParallelError):
                raise
            raise self.coordinator.fail(e) from e  # a collective broke: say which rank failed and why

    def _collect(self, sched: SchedulerOutput, pending: PendingSample,
                 queued: SchedulerOutput | None = None) -> tuple[StepResult, float]:
        """The step's sampled tokens on the host, and the seconds spent waiting for them. If the
        device failed, the step (and `queued`, launched behind it) is abandoned."""
        start = time.perf_counter()
        try:
            result = pending.result()
        except Exception:
            self.scheduler.forget_step(sched)
            if queued is not None:
                self.scheduler.forget_step(queued)
            raise
        return result, time.perf_counter() - start

    def _abandon(self, sched: SchedulerOutput) -> None:
        """A step failed while launching: it and the step in flight are dropped, and their
        requests recompute from scratch later."""
        if self._inflight is not None:
            self.scheduler.forget_step(self._inflight[0])
            self._inflight = None
        self.scheduler.forget_step(sched)

    def _outputs(self, touched: list[Request]) -> list[RequestOutput]:
        groups: dict[str, list[Request]] = {}
        for req in touched:
            group_id = req.request_id.rsplit("#", 1)[0]
            if group_id in self._groups:
                groups[group_id] = self._groups[group_id]
        results = []
        for group_id, group in groups.items():
            out = make_request_output(group)
            if all(r.finished for r in group):
                del self._groups[group_id]
            if out is not None:
                results.append(out)
        self._track_peaks()
        return results

    def _track_peaks(self) -> None:
        usage = self.kv.usage()
        self.peak_bytes_used = max(self.peak_bytes_used, usage.bytes_used)
        self.peak_bytes_committed = max(self.peak_bytes_committed, usage.bytes_committed)
        self.peak_bytes_physical = max(self.peak_bytes_physical, usage.bytes_physical)

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
        s = self.scheduler
        if s.prefix_queries:
            line += (f"; prefix cache: {s.prefix_hits}/{s.prefix_queries} tokens hit "
                     f"({s.prefix_hits / s.prefix_queries:.0%}), peak "
                     f"{self.peak_bytes_physical / mib:.2f} MiB with shared prefixes counted once")
        counters = self.kv.usage().counters
        if "pages_mapped_critical" in counters:
            line += (f"; {counters['pages_mapped_critical']} pages mapped in "
                     f"{counters['map_seconds_critical']:.3f} s on the engine thread")
        return line

    def close(self) -> None:
        self.kv.close()
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None


def _load_tokenizer(model_path: str):
    if model_path in PRESETS or not (Path(model_path) / "tokenizer.json").is_file():
        return None
    from ..models.tokenizer import Tokenizer
    return Tokenizer.from_dir(model_path)


def read_chat_template(value: str) -> str:
    """--chat-template's value: a file's text, or the template itself (it has Jinja markup)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")
