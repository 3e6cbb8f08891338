"""IncrementalDetokenizer: one request's output text, a token at a time, equal to a full decode.

Each step decodes only a short window of recent tokens and emits the text the new token adds
(vLLM's prefix/read-offset scheme, which is also what `tokenizers.decoders.DecodeStream` does):

    ids:     ... | emitted earlier | last emitted chunk | held back (not yet emitted) |
                                   ^ window start       ^ _read                       ^ newest
    text of the new ids = decode(window) minus decode(last emitted chunk), the "prefix"

Decoding the prefix along with the new ids gives the context a decoder needs: a byte-level
character split across tokens, a Metaspace "▁" that is a space except at the very start. Text is
held back while the window's decode ends in U+FFFD (a character still split) or adds nothing.

DecodeStream (tokenizers 0.23) is not used because, checked against `Tokenizer.decode`:
  * it has no flush: text it holds back when a sequence ends mid-character is out of reach, and
    its buffered ids are not exposed, so the caller cannot decode them either (with byte-level
    BPE such as SmolLM2's, that tail was its only difference from the full decode);
  * with ByteFallback decoders (Llama, Mistral), a full decode turns a whole run of consecutive
    `<0xXX>` byte tokens into one U+FFFD per byte as soon as any byte in the run is invalid or the
    run ends mid-character. A character DecodeStream emitted early is then wrong in hindsight: the
    stream's text stops matching the full decode, or it raises "Invalid prefix".
So byte tokens are held until the run ends (the next non-byte token, or flush), and skipped
special tokens, which decode drops before its decoder runs, are dropped here without decoding.
The window is then one chunk plus the held tokens: a few ids for real text, never the history
(a run of k held tokens costs O(k) a step; only output that is all byte tokens makes k large).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns one request's output ids into text as they arrive; `text` is all emitted so far."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self._backend = tokenizer.backend  # a tokenizers.Tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Ids decode drops before its decoder runs, so they never change the text.
        self._dropped_ids: set[int] = {
            i for i, t in self._backend.get_added_tokens_decoder().items() if t.special
        } if skip_special_tokens else set()
        self._window: list[int] = []  # the last emitted chunk, then the held-back ids
        self._read = 0                # window[:_read] is the last emitted chunk
        self._prefix = ""             # decode(window[:_read]), computed once per chunk
        self._pieces: list[str] = []  # emitted text, joined only when `text` is read

    def step(self, token_id: int) -> str:
        """The text this token completes ("" while it completes none, e.g. a split character)."""
        if token_id in self._dropped_ids:
            return ""
        self._window.append(token_id)
        if _is_byte_token(self._backend.id_to_token(token_id)):
            return ""  # a run of byte tokens decodes as a whole: wait for it to end
        decoded = self._decode(self._window)
        if len(decoded) <= len(self._prefix) or decoded.endswith("\ufffd"):
            return ""
        return self._emit(decoded[len(self._prefix):])

    def flush(self) -> str:
        """At the end: the held-back text, as the full decode renders it (U+FFFD included)."""
        return self._emit(self._decode(self._window)[len(self._prefix):])

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, piece: str) -> str:
        """Record the held-back ids' text; they become the prefix of the next window."""
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix = self._decode(self._window)
        if piece:
            self._pieces.append(piece)
        return piece


def _is_byte_token(token: str | None) -> bool:
    """Spelled `<0xXX>`: a ByteFallback decoder reads it as one raw byte (the test it applies).
    In a vocabulary without ByteFallback such a token is merely held a little, never mis-decoded."""
    return token is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
