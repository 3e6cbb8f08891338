"""Engine configuration: one dataclass per concern, every field defaulted and documented.
The CLI (`vattention generate --help`) is generated from these fields and their comments."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

KV_CACHE_MODES = ("vattention", "paged", "static")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model runs, on which device, in which precision."""

    model: str | None = None  # HF model directory or preset shape; None = the built-in SmolLM2-135M-Instruct
    load_format: str = "auto"  # auto (safetensors) or dummy (random weights at the config's shapes)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    max_model_len: int | None = None  # context length; None = the model's (capped by sliding window)
    dummy_seed: int = 0  # seed of the random weights that --load-format dummy draws
    generation_config: str = "auto"  # sampling defaults for what a request leaves unset: auto (the model's generation_config.json, as vLLM) or vattention (SamplingParams' own)
    enforce_eager: bool = False  # run every step eagerly; otherwise (one CUDA GPU, flash or triton attention) decode-only steps replay CUDA graphs
    max_graph_batch_size: int = 256  # largest decode batch captured as a CUDA graph (sizes 1, 2, 4, 8, 16, 24, ... up to it and max_num_seqs); larger batches run eagerly
    chat_template: str | None = None  # a chat template replacing the model's: a file path or the Jinja text itself (as vllm serve --chat-template)
    warm_up: str = "auto"  # run a few throwaway requests at start (prefills alone, batched and over an earlier chunk or cached prefix, then decodes) so the kernels compile before the first real request: auto (on CUDA), on, off

    def __post_init__(self):
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        if self.warm_up not in ("auto", "on", "off"):
            raise ValueError(f"warm_up must be auto, on or off, got {self.warm_up!r}")
        if self.generation_config not in ("auto", "vattention"):
            raise ValueError(f"generation_config must be auto or vattention, got {self.generation_config!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        return dev

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        dtype = DTYPES[self.dtype]
        return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


@dataclass
class CacheConfig:
    """How the KV cache is laid out and how much memory it may map."""

    kv_cache: str = "vattention"  # KV design: vattention (demand-mapped virtual memory), paged (block tables), static (max_model_len reserved per request)
    layout: str = "cross_layer"  # vattention layout: cross_layer (one page for all layers) or per_layer
    kv_cache_memory_gib: float | None = None  # KV budget; None = 90% of free GPU memory after the model (CPU: 4 GiB)
    page_size: int | None = None  # bytes per page; None = driver granularity (2 MiB)
    block_size: int = 16  # paged: tokens per block
    enable_prefix_caching: bool = True  # reuse the KV of a prompt's cached start (vattention: shared pages; paged: shared blocks; static: none)
    attention_backend: str = "auto"  # auto (CUDA: triton, our split-KV decode with FA2 prefill; CPU: sdpa), flash, triton, flex (paged), sdpa, reference

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {self.kv_cache!r}")
        if self.layout not in ("cross_layer", "per_layer"):
            raise ValueError(f"layout must be cross_layer or per_layer, got {self.layout!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")


@dataclass
class SchedulerConfig:
    """How many sequences and tokens one step may batch."""

    max_num_seqs: int = 64  # sequences running at once (KV slots)
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks
    async_scheduling: bool = True  # overlap: schedule and launch step N+1 while the device runs step N, collecting step N's tokens after (one device step in flight); off = schedule, run, wait, every step (tensor parallelism runs this way)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ParallelConfig:
    """How many GPUs (or CPU processes) one model is split across."""

    tensor_parallel_size: int = 1  # ranks sharing each layer (Megatron-style heads/MLP split); >1 starts worker processes, or joins a torchrun launch
    distributed_backend: str = "auto"  # torch.distributed backend of the all-reduces: auto (nccl on CUDA, gloo on CPU), nccl, gloo
    distributed_timeout_s: float = 600.0  # a collective waiting this long on a rank that neither answers nor exits is an error

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed_backend must be auto, nccl or gloo, got {self.distributed_backend!r}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")


@dataclass
class EngineConfig:
    """Everything the engine needs, one part per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Route flat keyword arguments (as LLM(...) and the CLI take them) to their dataclass."""
        parts = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                 "parallel": ParallelConfig}
        routed: dict[str, dict] = {name: {} for name in parts}
        for key, value in kwargs.items():
            owner = next((n for n, c in parts.items() if key in {f.name for f in fields(c)}), None)
            if owner is None:
                known = sorted(f.name for c in parts.values() for f in fields(c))
                raise TypeError(f"unknown engine option {key!r}; known: {', '.join(known)}")
            routed[owner][key] = value
        return cls(**{name: parts[name](**routed[name]) for name in parts})


ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)  # what the CLI exposes as flags
