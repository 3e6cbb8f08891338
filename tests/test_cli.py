"""The CLI's options come from the config dataclasses: every field is a flag, its comment the help."""

from __future__ import annotations

import dataclasses

import pytest

from vattention.cli import ENGINE_CONFIGS, build_parser
from vattention.cli_args import field_comments
from vattention.config import EngineConfig
from vattention.sampling_params import SamplingParams


def test_generate_help_lists_every_config_field_with_its_comment(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse re-wraps lines (and hyphens)
    for cls in (*ENGINE_CONFIGS, SamplingParams):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("output_kind", "structured_outputs"):  # API objects, not command-line choices
                continue
            assert "--" + f.name.replace("_", "-") in help_text, f.name
            assert "".join(comments[f.name].split()) in help_text, f"help for {f.name}"


def test_flags_reach_the_engine_config():
    ns = build_parser().parse_args(["generate", "x", "--max-num-seqs", "7", "--layout", "per_layer",
                                    "--kv-cache-memory-gib", "0.5", "--stop", "a", "b", "--n", "2"])
    from vattention.cli import _engine_kwargs, _sampling
    config = EngineConfig.from_kwargs(**_engine_kwargs(ns))
    assert config.scheduler.max_num_seqs == 7 and config.cache.layout == "per_layer"
    assert config.cache.kv_cache_memory_gib == 0.5
    params = _sampling(ns)
    assert params.stop == ["a", "b"] and params.n == 2


def test_config_values_are_validated():
    with pytest.raises(ValueError, match="layout must be cross_layer or per_layer"):
        EngineConfig.from_kwargs(layout="paged")
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        EngineConfig.from_kwargs(max_num_seqs=0)


def test_logit_bias_flag_takes_id_equals_bias_entries(capsys):
    from vattention.cli import _sampling
    ns = build_parser().parse_args(["generate", "x", "--logit-bias", "5=100", "7=-1.5"])
    assert _sampling(ns).logit_bias == {5: 100.0, 7: -1.5}
    assert _sampling(build_parser().parse_args(["generate", "x"])).logit_bias == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", "--logit-bias", "5"])
    assert "expected KEY=VALUE, got '5'" in capsys.readouterr().err


def test_sampling_flags_given_override_the_model_defaults_and_the_rest_follow_them():
    from vattention.cli import _sampling
    defaults = {"temperature": 0.0, "top_p": 0.9}
    ns = build_parser().parse_args(["generate", "x", "--top-p", "0.5", "--max-tokens", "3"])
    params = _sampling(ns, defaults=defaults)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 0.5, 3)
    assert _sampling(build_parser().parse_args(["chat"]), ("n", "logprobs"), defaults).top_p == 0.9
    assert _sampling(build_parser().parse_args(["generate", "x"])).temperature == 1.0  # no defaults
