"""The `vattention` command line.

  vattention generate "prompt" [sampling and engine options]   one answer, streamed, then a KV summary
  vattention chat [engine options]                              interactive, with chat template, streamed
(generate and chat answer up to 512 tokens unless --max-tokens says otherwise)
  vattention demo                                               the memory library on its own
  vattention bench memory [...]                                 benchmarks (tables + JSON)
Engine and sampling options are generated from the config dataclasses (see --help).
"""

from __future__ import annotations

import argparse
import sys

from .cli_args import add_dataclass_args, dataclass_values
from .config import ENGINE_CONFIGS
from .sampling_params import SamplingParams
from .server.cli import add_serve_args, run_serve

CHAT_SKIP = ("n", "logprobs", "output_kind", "structured_outputs")
CLI_MAX_TOKENS = 512  # generate/chat without --max-tokens: a whole answer, not SamplingParams' 16


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(parser, cls)


def _engine_kwargs(ns: argparse.Namespace) -> dict:
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(dataclass_values(ns, cls))
    return kwargs


def _sampling(ns: argparse.Namespace, skip: tuple[str, ...] = (), defaults: dict | None = None) -> SamplingParams:
    """The sampling flags given, over `defaults` (the model's), over SamplingParams' own."""
    return SamplingParams(**{**(defaults or {}), **dataclass_values(ns, SamplingParams, skip)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt as a user message in the chat template, if the model has one")
    add_dataclass_args(gen, SamplingParams, skip=("output_kind", "structured_outputs"), only_given=True)
    _add_engine_args(gen)

    chat = sub.add_parser("chat", help="talk to the model (empty line or Ctrl-D ends)")
    chat.add_argument("--system", default=None, help="a system message")
    add_dataclass_args(chat, SamplingParams, skip=CHAT_SKIP, only_given=True)
    _add_engine_args(chat)

    add_serve_args(sub.add_parser("serve", help="an OpenAI-compatible HTTP server, like vllm serve"))

    demo = sub.add_parser("demo", help="the memory library alone: map, write, read, free KV pages")
    demo.add_argument("--device", default="cpu", help="cpu (host driver) or cuda[:N]")
    demo.add_argument("--layout", default="cross_layer", choices=["cross_layer", "per_layer"])
    demo.add_argument("--page-size", type=int, default=None,
                      help="bytes per page (default: driver granularity, 2 MiB); host accepts 64 KiB")
    demo.add_argument("--budget-mib", type=int, default=256, help="physical KV memory budget")

    bench = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    bench.add_argument("suite", choices=["memory", "offline", "kernels", "capacity", "throughput", "serve", "latency", "prefix"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "serve":
        return run_serve(ns)
    try:
        if ns.command == "generate":
            return _generate(ns)
        if ns.command == "chat":
            return _chat(ns)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"vattention {ns.command}: error: {e}", file=sys.stderr)
        return 2
    if ns.command == "demo":
        from .demo import run_demo
        run_demo(ns.device, ns.layout, ns.page_size, ns.budget_mib)
    elif ns.command == "bench":
        from importlib import import_module
        return import_module(f".bench.{ns.suite}", __package__).main(ns.args)
    return 0


def _cli_defaults(llm) -> dict:
    return {"max_tokens": CLI_MAX_TOKENS, **llm.engine.default_sampling}


def _print_stream(llm, prompt, params: SamplingParams, chat: bool) -> str:
    """Print the answer as it is generated; returns all of it."""
    pieces = []
    for out in llm.stream(prompt, params, chat=chat):
        piece = out.outputs[0].text
        pieces.append(piece)
        print(piece, end="", flush=True)
        if out.error is not None:
            print(f"\n[error: {out.error}]", file=sys.stderr)
    print()
    return "".join(pieces)


def _generate(ns: argparse.Namespace) -> int:
    from .engine import LLM
    _sampling(ns)  # bad flags fail before the model loads
    llm = LLM(**_engine_kwargs(ns))
    params = _sampling(ns, defaults=_cli_defaults(llm))
    tok = llm.tokenizer
    chat = bool(ns.apply_chat_template and tok is not None and tok.chat_template is not None)
    prompt = [{"role": "user", "content": ns.prompt}] if chat else ns.prompt
    if params.n == 1 and tok is not None:
        _print_stream(llm, prompt, params, chat)
    else:
        outs = llm.chat(prompt, params) if chat else llm.generate(prompt, params)
        for completion in outs[0].outputs:
            if params.n > 1:
                print(f"--- sample {completion.index} ({completion.finish_reason})")
            print(completion.text)
    print(llm.engine.memory_summary(), file=sys.stderr)
    llm.close()
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from .engine import LLM
    _sampling(ns, CHAT_SKIP)
    llm = LLM(**_engine_kwargs(ns))
    params = _sampling(ns, CHAT_SKIP, _cli_defaults(llm))
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        answer = _print_stream(llm, messages, params, chat=True)
        messages.append({"role": "assistant", "content": answer})
        print(llm.engine.memory_summary(), file=sys.stderr)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
