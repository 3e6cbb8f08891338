"""The engine's tokenizer: text <-> token ids, chat prompts, and which ids end a sequence.

Built from a Hugging Face model directory with the `tokenizers` library and jinja2 only
(transformers is not a runtime dependency):

    tokenizer.json          -> the backend (vocabulary, merges, pre-tokenizer, added tokens)
    tokenizer_config.json   -> chat_template, bos_token, eos_token, add_bos_token   (optional)
    chat_template.jinja     -> chat template, where newer HF versions save it        (optional)
    generation_config.json  -> eos_token_id, an int or a list                        (optional)
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool = False, extra_eos_token_ids: set[int] | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        # None when the vocabulary lacks the token named in the config.
        self.bos_token_id: int | None = None if bos_token is None else backend.token_to_id(bos_token)
        eos_id = None if eos_token is None else backend.token_to_id(eos_token)
        # Generation stops at any of these: the tokenizer's EOS plus generation_config's list
        # (chat models often end turns with a token other than the tokenizer's EOS).
        self.eos_token_ids: set[int] = set(extra_eos_token_ids or ()) | (
            set() if eos_id is None else {eos_id})
        # Prepend BOS ourselves only if asked to and tokenizer.json's post-processor does not.
        self._prepend_bos = (add_bos_token and self.bos_token_id is not None
                             and backend.encode("").ids[:1] != [self.bos_token_id])
        self._template = None if chat_template is None else _compile_template(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (looked for {tokenizer_file}); "
                                    f"a Hugging Face model directory with a fast tokenizer is needed")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):
            # Several named templates; the engine serves plain chat, which is the "default" one.
            template = {t["name"]: t["template"] for t in template}.get("default")
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        return cls(backend, chat_template=template,
                   bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")),
                   add_bos_token=bool(config.get("add_bos_token", False)),
                   extra_eos_token_ids=set(eos_ids or ()))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token stands for: the longest vocabulary entry
        (byte-level entries spell one character per byte, so their length bounds the decoded
        text). A text of more than n * this many characters has more than n tokens."""
        return max(len(piece) for piece in self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not), so a large prompt
        # tokenized on a worker thread leaves the server's event loop running.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """The text of one token as a user would read it (a lone partial UTF-8 byte shows as U+FFFD)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def set_chat_template(self, source: str) -> None:
        """Use `source` (Jinja, as in tokenizer_config.json) instead of the model's template;
        a syntax error is a ValueError that says where."""
        self.chat_template, self._template = source, compile_chat_template(source)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text for a conversation, rendered as transformers renders it."""
        if self._template is None:
            raise ValueError("this model has no chat template (no chat_template in its "
                             "tokenizer_config.json); send a plain-text prompt instead")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def compile_chat_template(source: str) -> jinja2.Template:
    """The template, or a ValueError saying where it does not parse."""
    try:
        return _compile_template(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed template with the environment transformers gives chat templates."""
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja2's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str | None:
    """Special tokens appear as strings or as serialized AddedTokens ({"content": ...})."""
    return token.get("content") if isinstance(token, dict) else token
