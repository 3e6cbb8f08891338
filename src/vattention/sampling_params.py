"""SamplingParams: how one request chooses its tokens and when it stops (OpenAI / vLLM names)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .outputs import RequestOutputKind

# Seeds are 64-bit signed integers, as OpenAI and vLLM take them; sample i of n draws from seed + i,
# which torch's generators accept up to 2**64 - 1.
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1


@dataclass
class SamplingParams:
    """Every field defaulted; invalid values raise ValueError naming the field and the rule."""

    n: int = 1  # independent completions of the same prompt
    best_of: int | None = None  # candidates sampled (>= n; None = n); the n with the highest cumulative logprob are returned, at the end (not with DELTA outputs)
    temperature: float = 1.0  # 0 = greedy; >0 divides the logits
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (HF rule)
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output (OpenAI rule)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output (OpenAI rule)
    seed: int | None = None  # per-request generator: same seed, same tokens
    max_tokens: int | None = 16  # output tokens at most; None = up to the context length
    min_tokens: int = 0  # output tokens before EOS or stop_token_ids may be sampled and stop strings match (vLLM's)
    stop: list[str] = field(default_factory=list)  # text that ends the output (not included)
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the output
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    logprobs: int | None = None  # return the sampled token's logprob and this many top ones
    prompt_logprobs: int | None = None  # also each prompt token's logprob (from the second on) and this many top ones; such a request computes its whole prompt (no cached prefix)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    structured_outputs: StructuredOutputs | None = None  # the output held to a JSON schema, any JSON, a regex or a choice (needs xgrammar)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before choosing, in [-100, 100] (OpenAI rule; logprobs stay the model's)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each output holds: everything so far, only what is new, or one output at the end (outputs.py)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = dict(self.logit_bias or {})
        self.output_kind = RequestOutputKind(self.output_kind)  # also takes its value, e.g. "delta"
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError("invalid SamplingParams: structured_outputs must be a StructuredOutputs")
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"),
            (self.best_of is None or (isinstance(self.best_of, int) and not isinstance(self.best_of, bool)
                                      and self.best_of >= self.n),
             f"best_of must be an integer >= n ({self.n}), got {self.best_of}"),
            (self.num_candidates == self.n or self.output_kind is not RequestOutputKind.DELTA,
             "best_of > n cannot stream (DELTA outputs): the best samples are known only at the end"),
            (_finite(self.temperature) and self.temperature >= 0,
             "temperature must be a finite number >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0 (or -1 for all)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be a finite number > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens must be an integer >= 1 (or None)"),
            (isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool) and self.min_tokens >= 0
             and (self.max_tokens is None or not isinstance(self.max_tokens, int) or self.min_tokens <= self.max_tokens),
             f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs must be an integer in [0, 20]"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs must be an integer in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (self.seed is None or (isinstance(self.seed, int) and MIN_SEED <= self.seed <= MAX_SEED),
             f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed}"),
            (all(isinstance(t, int) and t >= 0 for t in self.logit_bias),
             "logit_bias keys must be non-negative token ids"),
            (all(isinstance(b, (int, float)) and -100 <= b <= 100 for b in self.logit_bias.values()),
             "logit_bias values must be in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid SamplingParams: {message}")

    @property
    def num_candidates(self) -> int:
        """Samples drawn for the request: best_of, else n."""
        return self.best_of if isinstance(self.best_of, int) and self.best_of > self.n else self.n

    @property
    def computed_logprobs(self) -> int | None:
        """Top logprobs the sampler computes per token: logprobs, or 0 (the chosen token's alone)
        where best_of ranks candidates by their cumulative logprob, or None (none at all)."""
        if self.logprobs is None and self.num_candidates > self.n:
            return 0
        return self.logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # the sampler treats near-zero temperature as greedy


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: a JSON schema (dict or its JSON text), any JSON object, a regex, a choice."""

    json: dict | str | None = None  # a JSON schema the output must validate against
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    whitespace: bool = False  # JSON: allow free whitespace between tokens (a sampler may then wander in it)

    def __post_init__(self):
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None]
        if sum(given) != 1:
            raise ValueError("invalid SamplingParams: structured_outputs takes exactly one of json, "
                             "json_object, regex, choice")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("invalid SamplingParams: structured_outputs choice must be non-empty strings")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid SamplingParams: structured_outputs json is not JSON: {e}") from None

    def key(self) -> tuple:
        schema = json.dumps(self.json, sort_keys=True) if isinstance(self.json, dict) else self.json
        return (schema, self.json_object, self.regex, self.choice, self.whitespace)
