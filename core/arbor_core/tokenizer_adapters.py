"""The two tokenizer libraries behind Tokenizer (tokenizer.py), each wrapped to the same small surface.

HFTokenizersAdapter wraps a `tokenizers.Tokenizer` (a tokenizer.json, or a GGUF byte-level BPE rebuilt
as one); SentencePieceAdapter a sentencepiece model (a tokenizer.model, or a GGUF 'llama' vocabulary
rebuilt as one: arbor_weights/gguf_vocab.py builds both from GGUF metadata). What Tokenizer asks of
either: `special_tokens` (control token text -> id), `vocab_size`, encode (control-token spellings stay
text), encode_with_offsets, encode_with_specials (control-token spellings become their ids, as the
library's own tokenizer does with a rendered chat), decode, token_to_id, id_to_token, adds_bos, save.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .chat_template import control_token_pattern, split_on_control_tokens
from .errors import CorruptModelError

# llama.cpp's token types (tokenizer.ggml.token_type); sentencepiece numbers its piece types the same.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

REPULL = "re-run `arbor pull <model>` to fetch it again"


class HFTokenizersAdapter:
    """A `tokenizers.Tokenizer`: a tokenizer.json, or a GGUF byte-level BPE rebuilt as one.

    One tokenizer serves plain text and rendered chats: its `encode_special_tokens` switch says whether a
    control token's spelling stays text, set for each encode under a lock (encodes from several threads
    never see each other's setting). A second copy of the tokenizer for plain text cost 0.38 s of every
    start on a 151K-token vocabulary (serialize, parse again) and its memory."""

    def __init__(self, tok):
        self._tok = tok
        self._specials_as_ids = not tok.encode_special_tokens  # the file's own setting, for rendered chats
        self._lock = threading.Lock()
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str, *, specials_as_ids: bool, add_special_tokens: bool = False):
        with self._lock:
            self._tok.encode_special_tokens = not specials_as_ids
            try:
                return self._tok.encode(text, add_special_tokens=add_special_tokens)
            finally:
                self._tok.encode_special_tokens = not self._specials_as_ids

    def encode(self, text: str) -> list[int]:
        return self._encode(text, specials_as_ids=False).ids  # a control token typed in text stays text

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._encode(text, specials_as_ids=False)
        return encoding.ids, encoding.offsets

    def encode_with_specials(self, text: str) -> list[int]:
        return self._encode(text, specials_as_ids=self._specials_as_ids).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def tokenizer_json(self) -> str:
        return self._tok.to_str()

    def adds_bos(self, bos_id: int) -> bool:
        """Whether tokenizer.json's post-processor puts BOS first (its way of saying add_bos_token)."""
        return self._encode("a", specials_as_ids=self._specials_as_ids, add_special_tokens=True).ids[:1] == [bos_id]

    def save(self, directory: Path) -> str:
        self._tok.save(str(directory / "tokenizer.json"))
        return "PreTrainedTokenizerFast"


class SentencePieceAdapter:
    """A sentencepiece model: a tokenizer.model, or a GGUF 'llama' vocabulary rebuilt as one."""

    def __init__(self, proto):
        import sentencepiece

        self._proto = proto
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (RuntimeError, OSError) as e:
            raise CorruptModelError(f"sentencepiece rejected the tokenizer model ({e}); {REPULL}") from None
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == CONTROL}
        self.vocab_size = len(proto.pieces)
        # sentencepiece drops the leading space of the first piece it decodes (the dummy prefix).
        self._drops_first_space = proto.normalizer_spec.add_dummy_prefix

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)  # sentencepiece never matches CONTROL pieces in text

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        pieces = self._sp.encode(text, out_type="proto").pieces  # begin/end count UTF-8 bytes of text
        char_at = [i for i, c in enumerate(text) for _ in range(len(c.encode("utf-8")))] + [len(text)]
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def encode_with_specials(self, text: str) -> list[int]:
        # Each run of text after a control token gets its own dummy-prefix space, as in llama.cpp.
        ids = []
        pattern = control_token_pattern(self.special_tokens)
        for plain, special_id in split_on_control_tokens(text, pattern, self.special_tokens):
            ids += self.encode(plain) if plain else []
            ids += [] if special_id is None else [special_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # sentencepiece silently drops control ids, so decode the runs between them and splice them in.
        out, run = "", []
        for token_id in ids + [None]:
            if token_id is not None and not self._sp.IsControl(token_id):
                run.append(token_id)
                continue
            out += self._decode_run(run, at_start=not out)
            run = []
            if token_id is not None and not skip_special_tokens:
                out += self._sp.IdToPiece(token_id)
        return out

    def _decode_run(self, run: list[int], at_start: bool) -> str:
        text = self._sp.decode(run) if run else ""
        if run and not at_start and self._drops_first_space and self._sp.IdToPiece(run[0]).startswith("\u2581"):
            text = " " + text  # mid-text, that space belongs to the output
        return text

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.PieceToId(token)
        return token_id if self._sp.IdToPiece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.IdToPiece(token_id)

    def tokenizer_json(self) -> None:
        return None  # a sentencepiece model has no tokenizer.json

    def adds_bos(self, bos_id: int) -> bool:
        return True  # what LlamaTokenizer does when tokenizer_config.json does not say

    def save(self, directory: Path) -> str:
        (directory / "tokenizer.model").write_bytes(self._proto.SerializeToString())
        return "LlamaTokenizer"
