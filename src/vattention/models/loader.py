"""Build a model on its device and fill its weights: from a Hugging Face directory
(config.json + *.safetensors), or random ("dummy") for any config, e.g. a preset shape.

Loading goes one way, checkpoint tensor -> the rows of a parameter it fills (checkpoint_targets):
a tensor's own parameter, or for a MergedLinear its part of the stacked rows:

    model.layers.0.self_attn.q_proj.weight ─┐                 rows [0, q)
    model.layers.0.self_attn.k_proj.weight ─┼─> qkv_proj.weight  [q, q + kv)
    model.layers.0.self_attn.v_proj.weight ─┘                 [q + kv, q + 2 kv)
    (gate_proj, up_proj ─> gate_up_proj the same way; biases like their weights)

Under tensor parallelism each rank builds and reads only its slices (sharding.py), and q, k, v
are this rank's rows of each: safetensors' get_slice reads just those bytes of the file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelArchConfig
from .gemma import model_class
from .llama import Collectives, LlamaForCausalLM, MergedLinear
from .moe import StackedExperts
from .presets import PRESETS
from .sharding import Shard


def resolve_arch_config(model: str | Path) -> ModelArchConfig:
    """A model directory's config.json, or a preset name (for dummy weights)."""
    if str(model) in PRESETS:
        return ModelArchConfig.from_dict(PRESETS[str(model)])
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {str(model)!r} is neither a directory nor a preset "
                                f"({', '.join(sorted(PRESETS))})")
    return ModelArchConfig.from_dir(path)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelArchConfig, device: torch.device, dtype: torch.dtype, shard: Shard = Shard(),
                comm: Collectives | None = None) -> LlamaForCausalLM:
    """Parameters allocated directly on `device` in `dtype` (no CPU copy), contents undefined."""
    with _default_dtype(dtype), torch.device("meta"):
        model = model_class(cfg)(cfg, shard, comm)
    model = model.to_empty(device=device)
    model.reset_rope(device)
    model.tie_weights()
    return model.eval()


def checkpoint_targets(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the view of the parameter it fills (this rank's rows). A tied
    lm_head is the embedding's parameter and has no entry of its own."""
    targets = {}
    for module_name, module in model.named_modules():
        if isinstance(module, StackedExperts):
            targets.update(module.checkpoint_parts(module_name))
            continue
        for leaf, param in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                parent, start = module_name.rpartition(".")[0], 0
                for part, rows in module.parts.items():
                    targets[f"{parent}.{part}.{leaf}"] = param.narrow(0, start, rows)
                    start += rows
            else:
                targets[f"{module_name}.{leaf}"] = param
    if model.config.tie_word_embeddings:
        del targets["lm_head.weight"]
    return targets


def load_safetensors(model: LlamaForCausalLM, path: Path) -> None:
    """Copy every tensor of the directory's safetensors files into the rows it fills."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    targets = checkpoint_targets(model)
    with torch.device("meta"):
        whole = {n: t.shape for n, t in checkpoint_targets(type(model)(model.config)).items()}
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():
                name = _our_name(stored, model.config.architecture)
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                source = f.get_slice(stored)
                parts = _fused_parts(name, targets)
                if parts is not None:  # Phi-3's qkv_proj / gate_up_proj: the parts, row by row
                    rows = [whole[p][0] for p in parts]
                    shape = tuple(source.get_shape())
                    if shape != (sum(rows), *whole[parts[0]][1:]):
                        raise ValueError(f"{file.name}: {name} has shape {shape}, the config implies "
                                         f"{(sum(rows), *whole[parts[0]][1:])}")
                    offset = 0
                    for part, n in zip(parts, rows):
                        _refuse_twice(part, loaded, file.name)
                        _copy_shard(targets[part], _Rows(source, offset, n), part, whole[part], model)
                        loaded.add(part)
                        offset += n
                    continue
                if name not in targets:
                    raise ValueError(f"{file.name}: tensor {name!r} matches no parameter of "
                                     f"{model.config.architecture}")
                _refuse_twice(name, loaded, file.name)
                if tuple(source.get_shape()) != tuple(whole[name]):
                    raise ValueError(f"{file.name}: {name} has shape {tuple(source.get_shape())}, "
                                     f"the config implies {tuple(whole[name])}")
                _copy_shard(targets[name], source, name, whole[name], model)
                loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:3]}")


def _refuse_twice(name: str, loaded: set[str], file: str) -> None:
    if name in loaded:
        raise ValueError(f"{file}: {name} is given twice (fused and as its own tensor, or in two files)")


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
MIXTRAL_NAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def _our_name(name: str, architecture: str) -> str:
    """A checkpoint tensor's name as our modules call it: Mixtral's experts get the names every
    other family uses (block_sparse_moe.experts.0.w1 -> mlp.experts.0.gate_proj)."""
    if architecture == "MixtralForCausalLM" and ".block_sparse_moe." in name:
        for theirs, ours in MIXTRAL_NAMES.items():
            name = name.replace(theirs, ours)
    return name


def _fused_parts(name: str, targets: dict) -> list[str] | None:
    """The part names a fused checkpoint tensor (e.g. ...self_attn.qkv_proj.weight) holds, in
    row order, when the model keeps them as separately named parts."""
    prefix, _, rest = name.rpartition(".")
    head, _, leaf = prefix.rpartition(".")
    if leaf not in FUSED:
        return None
    parts = [f"{head}.{p}.{rest}" for p in FUSED[leaf]]
    return parts if all(p in targets for p in parts) else None


class _Rows:
    """Rows [offset, offset + n) of a safetensors slice, sliced as the slice itself is."""

    def __init__(self, source, offset: int, n: int):
        self.source, self.offset, self.n = source, offset, n

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        start, stop, _ = rows.indices(self.n)
        shifted = slice(self.offset + start, self.offset + stop)
        return self.source[(shifted, *key[1:])] if isinstance(key, tuple) else self.source[shifted]


def _copy_shard(dest: torch.Tensor, source, name: str, whole: torch.Size, model: LlamaForCausalLM) -> None:
    """Copy this rank's slice of a checkpoint tensor (all of it without sharding) into dest;
    `whole` is the unsharded shape the config implies."""
    where = model.shard.slice_of(name, model.config)
    with torch.no_grad():
        if where is None:
            dest.copy_(source[:])
            return
        dim, start, length = where
        stop = min(start + length, whole[dim])  # the last vocabulary slice may run into padding
        part = source[start:stop] if dim == 0 else source[:, start:stop]
        if stop - start < length:
            dest.zero_()
        dest.narrow(dim, 0, stop - start).copy_(part)


def init_dummy(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights at the real shapes: N(0, 0.02) matrices, unit norms, zero biases."""
    gen = torch.Generator(device=model.inv_freq.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(model.unit_norm_weight)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def load_model(model: str | Path, load_format: str, device: torch.device, dtype: torch.dtype,
               seed: int = 0, shard: Shard = Shard(), comm: Collectives | None = None) -> LlamaForCausalLM:
    """Dummy weights under tensor parallelism are drawn per rank (seed + rank): the same shapes
    and statistics as one rank's, not its values."""
    cfg = resolve_arch_config(model)
    net = build_model(cfg, device, dtype, shard, comm)
    if load_format == "dummy":
        init_dummy(net, seed + shard.rank)
    elif load_format in ("auto", "safetensors"):
        if str(model) in PRESETS:
            raise ValueError(f"{model!r} is a preset shape without weights; add --load-format dummy")
        load_safetensors(net, Path(model))
    else:
        raise ValueError(f"unknown load_format {load_format!r}; use auto, safetensors or dummy")
    return net


def read_generation_eos(path: Path) -> set[int]:
    """EOS ids from generation_config.json, which chat models often extend."""
    file = path / "generation_config.json"
    if not file.is_file():
        return set()
    eos = json.loads(file.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_defaults(path: Path) -> dict[str, float | int]:
    """The sampling defaults a model ships in generation_config.json (the keys vLLM takes from it:
    temperature, top_p, top_k, min_p, repetition_penalty); {} when there are none."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    config = json.loads(file.read_text())
    return {k: config[k] for k in GENERATION_DEFAULT_KEYS if config.get(k) is not None}
