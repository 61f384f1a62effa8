"""Text <-> token ids for every model arbor runs; chat_template.py renders the conversation.

Two adapters feed one Tokenizer (tokenizer_adapters.py): a HF `tokenizer.json` (read by the `tokenizers`
library) and a sentencepiece `tokenizer.model`; the vocabulary a GGUF file keeps in its metadata is
rebuilt as one of those two (arbor_weights/gguf_vocab.py); load_tokenizer reads a HF-style model
directory. Two rules hold for all of them:
- Text a user supplies is only ever text. "<|im_start|>" typed in a prompt or a document is spelled
  out in ordinary tokens, so it cannot forge a chat turn; only the chat template emits control ids.
- Streamed output never shows half a character (StreamDecoder holds incomplete UTF-8 back).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .chat_template import (
    PLAIN_PROMPT_TEMPLATE,
    control_token_pattern,
    fresh_markers,
    render_template,
    shielded,
    split_on_control_tokens,
)
from .errors import CorruptModelError
from .tokenizer_adapters import REPULL, HFTokenizersAdapter, SentencePieceAdapter

# Tokens that end an assistant turn; configs often name only the base model's end-of-text as eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


class Tokenizer:
    """One model's tokenizer: plain encode/decode, control-token bookkeeping and chat rendering."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], chat_template: str | None,
                 add_bos: bool, name: str | None = None):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.name = name  # the model's, for template errors
        self.add_bos = bool(add_bos) and bos_id is not None
        self._specials: dict[str, int] = backend.special_tokens  # control token text -> id
        self._special_ids = set(self._specials.values())
        self._special_pattern = control_token_pattern(self._specials)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_special_tokens and self.add_bos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and, for each id, the (start, end) characters of `text` it came from."""
        return self._backend.encode_with_offsets(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def tokenizer_json(self) -> str | None:
        """The HF tokenizer.json text this tokenizer runs (for a token-mask library), None for sentencepiece."""
        return self._backend.tokenizer_json()

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled exactly `token`, if there is one."""
        return self._backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(lambda ids: self.decode(ids, skip_special_tokens))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it. Encoding this string with encode() would spell
        the template's control tokens out as text: use encode_chat() to get ids."""
        return self._render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation: the template's control tokens as single ids, message text
        as plain text even where it spells a control token.

        Any control-token spelling inside a message is wrapped in markers nobody can guess before
        rendering, so it is found again however the template moved or trimmed the content around it.
        """
        open_mark, close_mark = fresh_markers()
        rendered = self._render(shielded(messages, self._special_pattern, open_mark, close_mark),
                                add_generation_prompt)
        if open_mark not in rendered:  # no message spells a control token: tokenize as HF does
            return self._backend.encode_with_specials(rendered)
        return self._encode_shielded(rendered, open_mark, close_mark)

    def save(self, directory) -> None:
        """Write tokenizer.json or tokenizer.model, plus the tokenizer_config.json HF tools read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in ("tokenizer.json", "tokenizer.model", "chat_template.jinja"):  # loading prefers these
            (directory / stale).unlink(missing_ok=True)
        tokenizer_class = self._backend.save(directory)
        config = {"tokenizer_class": tokenizer_class, "bos_token": self._token_text(self.bos_id),
                  "eos_token": self._token_text(self.eos_ids[0] if self.eos_ids else None),
                  "add_bos_token": self.add_bos, "add_eos_token": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        bos = self._token_text(self.bos_id) or ""
        if self.chat_template is None:  # a base model, prompted as plain text by summarize and ask
            return (bos if self.add_bos else "") + render_template(
                PLAIN_PROMPT_TEMPLATE, messages, add_generation_prompt=add_generation_prompt, name=self.name,
                bos_token=bos, eos_token="")
        return render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               name=self.name, bos_token=bos,
                               eos_token=self._token_text(self.eos_ids[0] if self.eos_ids else None) or "")

    def _encode_shielded(self, rendered: str, open_mark: str, close_mark: str) -> list[int]:
        pieces = re.split(f"{re.escape(open_mark)}(.*?){re.escape(close_mark)}", rendered, flags=re.DOTALL)
        ids, plain = [], ""
        for index, piece in enumerate(pieces):
            if index % 2:  # odd pieces are control-token spellings from a message: text
                plain += piece
                continue
            piece = piece.replace(open_mark, "").replace(close_mark, "")  # a marker the template cut apart
            for text, special_id in split_on_control_tokens(piece, self._special_pattern, self._specials):
                plain += text
                if special_id is not None:
                    ids += self._backend.encode(plain) if plain else []
                    ids.append(special_id)
                    plain = ""
        return ids + (self._backend.encode(plain) if plain else [])


class StreamDecoder:
    """Turns ids into text as they arrive, never handing out half a character.

    Decoding one id at a time goes wrong twice: an emoji spread over several byte tokens decodes to
    U+FFFD halves, and sentencepiece drops the space that starts a word decoded alone. So each push
    decodes a short window that begins a token or more before the new one and hands out only what
    the window gained (the method of HF text-generation-inference).
    """

    def __init__(self, decode):
        self._decode = decode
        self._window: list[int] = []  # ids from the window start; the first `_read` are handed out
        self._read = 0

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        seen = self._decode(self._window[:self._read])
        text = self._decode(self._window)
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character whose remaining bytes are still to come
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return text[len(seen):]

    def flush(self) -> str:
        """Whatever is held back, even an incomplete character (as U+FFFD)."""
        seen = self._decode(self._window[:self._read])
        text = self._decode(self._window)
        self._window, self._read = [], 0
        return text[len(seen):]


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer of a HF-style model directory (tokenizer.json or tokenizer.model + configs)."""
    directory = Path(directory)
    backend = _backend_from_directory(directory)
    config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    bos_id = _id_of(backend, config.get("bos_token"))
    bos_id = model_config.get("bos_token_id") if bos_id is None else bos_id
    template = _chat_template_from(directory, config)
    declared = [_id_of(backend, config.get("eos_token")),
                *_as_list(_read_json(directory / "generation_config.json").get("eos_token_id")),
                *_as_list(model_config.get("eos_token_id"))]
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_id is not None and backend.adds_bos(bos_id)
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids_for(backend, declared, template),
                     chat_template=template, add_bos=add_bos, name=directory.name)


def _backend_from_directory(directory: Path):
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return HFTokenizersAdapter(RustTokenizer.from_file(str(directory / "tokenizer.json")))
        except Exception as e:  # noqa: BLE001 -- tokenizers reports every parse problem as a bare Exception
            raise CorruptModelError(f"{directory / 'tokenizer.json'} is not a valid tokenizer ({e}); "
                                    f"{REPULL}") from None
    if (directory / "tokenizer.model").is_file():
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2

        try:
            proto = sentencepiece_model_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
        except DecodeError as e:
            raise CorruptModelError(f"{directory / 'tokenizer.model'} is not a sentencepiece model ({e}); "
                                    f"{REPULL}") from None
        return SentencePieceAdapter(proto)
    raise CorruptModelError(f"{directory} has no tokenizer.json or tokenizer.model; {REPULL}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not valid JSON ({e}); {REPULL}") from None
    if not isinstance(value, dict):
        raise CorruptModelError(f"{path} should hold a JSON object; {REPULL}")
    return value


def _chat_template_from(directory: Path, config: dict) -> str | None:
    # Newer transformers save the template beside the config; older ones inside it, either as a
    # string or as named templates, of which "default" is the one for plain chat.
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _id_of(backend, token) -> int | None:
    if isinstance(token, dict):  # tokenizer_config.json may store a serialized AddedToken
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def eos_ids_for(backend, declared: list, template: str | None) -> list[int]:
    """Declared eos ids, then end-of-turn tokens the template writes: both must stop generation."""
    turn_ends = [backend.token_to_id(t) for t in _END_OF_TURN_TOKENS if template and t in template]
    ids = [i for i in [*declared, *turn_ends] if isinstance(i, int)]
    return list(dict.fromkeys(ids))

