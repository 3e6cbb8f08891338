"""What a request may be, checked in one place: the engine's add_request and the server's
handlers both call these (the server before tokenizing, where it can).

Every check raises RequestError, a ValueError that names the offending field (`param`, as the
OpenAI error envelope does) and, for context overruns, code "context_length_exceeded".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the engine cannot take, and which field says why."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestLimits:
    """What loading fixed: the bounds every request is checked against."""

    max_model_len: int  # the context length (the model's, capped by its window and the config)
    max_request_tokens: int  # prompt + output tokens one request may hold (context and KV budget)
    vocab_size: int
    max_chars_per_token: int | None = None  # the tokenizer's longest token, in characters (None: no tokenizer)

    def check_text_length(self, num_chars: int, field: str = "prompt") -> None:
        """Refuse, before tokenizing it, a text that cannot fit: no token stands for more than
        max_chars_per_token characters, so it has more tokens than the context holds."""
        if self.max_chars_per_token is None:
            return
        limit = self.max_request_tokens
        most_chars = limit * self.max_chars_per_token
        if num_chars > most_chars:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, "
                               f"your {field} has {num_chars} characters, more than {limit} tokens "
                               f"can spell ({most_chars}). Please reduce the length of the {field}.",
                               param=field, code="context_length_exceeded")

    def check_token_ids(self, ids: list[int], field: str = "prompt") -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of range [0, {self.vocab_size})", param=field)

    def check_prompt(self, ids: list[int], field: str = "prompt") -> None:
        if not ids:
            raise RequestError("the prompt is empty", param=field)
        self.check_token_ids(ids, field)
        self.room(len(ids), field)

    def room(self, prompt_len: int, field: str = "prompt") -> int:
        """Output tokens a prompt of prompt_len tokens leaves room for (at least 1, else refused)."""
        limit = self.max_request_tokens
        if prompt_len >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, "
                               f"your {field} resulted in {prompt_len} tokens, which leaves no room "
                               f"for the completion. Please reduce the length of the {field}.",
                               param=field, code="context_length_exceeded")
        return limit - prompt_len

    def check_context(self, prompt_len: int, max_tokens: int, field: str = "prompt") -> None:
        """A request that asks for more output than its prompt leaves room for (the server's rule;
        offline, the engine caps max_tokens at the room instead)."""
        limit = self.max_request_tokens
        if prompt_len + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, "
                               f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                               f"{field}, {max_tokens} in the completion). Please reduce the length "
                               f"of the {field} or completion.", param=field, code="context_length_exceeded")

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: ids against this model's vocabulary."""
        outside = sorted(t for t in params.logit_bias if t >= self.vocab_size)
        if outside:
            raise RequestError(f"logit_bias names token ids outside the vocabulary "
                               f"[0, {self.vocab_size}): {outside[:5]}", param="logit_bias")
