"""`vattention serve [MODEL]`: the OpenAI-compatible server, options generated from the configs.

    vattention serve                       the built-in SmolLM2-135M-Instruct on port 8000
    vattention serve /path/to/hf-model --port 8080 --api-key secret --max-num-seqs 32
Also runnable as `python -m vattention.server.cli [args]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from ..cli_args import add_dataclass_args, dataclass_values
from ..config import ENGINE_CONFIGS, EngineConfig

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `model` the default answers to
API_KEY_ENV = "VATTENTION_API_KEY"


@dataclass
class ServerConfig:
    """Where the OpenAI-compatible server listens, whom it answers and how it sheds load."""

    host: str = "0.0.0.0"  # address to listen on (0.0.0.0 = every interface, as vllm serve does)
    port: int = 8000  # TCP port
    served_model_name: str | None = None  # the `model` clients send; None = the model argument (or the default model's HF name)
    api_key: str | None = None  # require `Authorization: Bearer KEY` on /v1 (also read from $VATTENTION_API_KEY)
    max_queued_requests: int = 1024  # sequences waiting for admission beyond which requests get HTTP 503
    shutdown_timeout_s: float = 30.0  # on SIGTERM, seconds in-flight requests get to finish before they are aborted
    log_level: str = "info"  # uvicorn's: critical, error, warning, info, debug, trace
    max_request_body_bytes: int = 16 << 20  # a larger body is refused with 413 before it is read
    request_read_timeout_s: float = 30.0  # a connection must deliver its request (headers and body) within this from its first byte, or it is closed
    timeout_keep_alive_s: float = 5.0  # uvicorn's: an idle kept-alive connection is closed after this
    limit_concurrency: int | None = None  # uvicorn's: connections + tasks at once beyond which new ones get 503; None = unlimited
    stats_log_interval_s: float = 10.0  # log a one-line engine summary (throughput, running/waiting, KV used, prefix hit rate) this often while busy, as vLLM does; 0 = never
    allowed_origins: list[str] | None = None  # CORS: origins browsers may call from (e.g. '*' or https://app.example); unset = no CORS headers
    allowed_methods: list[str] | None = None  # CORS: methods allowed (default: all)
    allowed_headers: list[str] | None = None  # CORS: request headers allowed (default: all)
    allow_credentials: bool = False  # CORS: allow cookies and Authorization from those origins

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
        for name in ("request_read_timeout_s", "timeout_keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stats_log_interval_s < 0:
            raise ValueError(f"stats_log_interval_s must be >= 0, got {self.stats_log_interval_s}")
        if self.allow_credentials and self.allowed_origins and "*" in self.allowed_origins:
            raise ValueError("allow_credentials cannot be used with allowed_origins '*' (browsers refuse it); "
                             "name the origins")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1 (or unset), got {self.limit_concurrency}")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The serve subcommand's arguments: optional positional MODEL, then every config field."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory or preset, same as --model (default: the built-in "
                             "SmolLM2-135M-Instruct)")
    add_dataclass_args(parser, ServerConfig)
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(parser, cls)


def serve_configs(ns: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The parsed flags as configs; ValueError/TypeError name what is wrong."""
    if ns.model_tag is not None and ns.model not in (None, ns.model_tag):
        raise ValueError(f"the model is given twice: {ns.model_tag!r} and --model {ns.model!r}")
    engine_kwargs = {}
    for cls in ENGINE_CONFIGS:
        engine_kwargs.update(dataclass_values(ns, cls))
    engine_kwargs["model"] = ns.model_tag or ns.model
    server = ServerConfig(**dataclass_values(ns, ServerConfig))
    if server.served_model_name is None:
        server.served_model_name = engine_kwargs["model"] or DEFAULT_MODEL_NAME
    if server.api_key is None:
        server.api_key = os.environ.get(API_KEY_ENV) or None
    return server, EngineConfig.from_kwargs(**engine_kwargs)


def run_serve(ns: argparse.Namespace) -> int:
    """Load the model, then serve until SIGINT/SIGTERM; 2 on bad options, else 0."""
    import uvicorn

    from .app import build_app
    from .async_engine import AsyncEngine
    from .limits import make_protocol

    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        server, engine_config = serve_configs(ns)
        async_engine = AsyncEngine(engine_config, server.max_queued_requests)
        async_engine.start()
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"vattention serve: error: {e}", file=sys.stderr)
        return 2
    app = build_app(async_engine, server.served_model_name, server.api_key,
                    server.shutdown_timeout_s, server.max_request_body_bytes, server)
    engine = async_engine.engine
    logging.getLogger("vattention.server").info(
        "serving %s (%s on %s, context %d tokens, KV cache %s) at http://%s:%d/v1",
        server.served_model_name, engine.model_path, engine.device, engine.limits.max_model_len,
        engine.config.cache.kv_cache, server.host, server.port)
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level,
                timeout_graceful_shutdown=server.shutdown_timeout_s,
                http=make_protocol(server.request_read_timeout_s),
                timeout_keep_alive=server.timeout_keep_alive_s,
                limit_concurrency=server.limit_concurrency)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattention serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
