"""Text <-> token ids for every model arbor runs, and the chat template that frames a conversation.

Three sources feed one Tokenizer: a HF `tokenizer.json` (read by the `tokenizers` library), a
sentencepiece `tokenizer.model`, and the vocabulary a GGUF file keeps in its metadata (rebuilt as
one of those two). Two rules hold for all of them:
- Text a user supplies is only ever text. "<|im_start|>" typed in a prompt or a document is spelled
  out in ordinary tokens, so it cannot forge a chat turn; only the chat template emits control ids.
- Streamed output never shows half a character (StreamDecoder holds incomplete UTF-8 back).
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from arbor_cli.errors import ConfigError, CorruptModelError

# llama.cpp's token types (tokenizer.ggml.token_type); sentencepiece numbers its piece types the same.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits by llama.cpp `tokenizer.ggml.pre` name. Merges were learned on text cut this
# way, so cutting differently gives different (valid-looking, worse) ids. Unknown names get GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_BY_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                 "falcon3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
                 "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# llama.cpp uses a whole-word vocabulary entry before trying merges for these (as Llama 3's own tokenizer.json does).
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3"}

# Tokens that end an assistant turn; configs often name only the base model's end-of-text as eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
_REPULL = "re-run `arbor pull <model>` to fetch it again"


class ChatTemplateError(ConfigError):
    """A model without a chat template, or one whose template fails or is refused by the sandbox."""


class Tokenizer:
    """One model's tokenizer: plain encode/decode, control-token bookkeeping and chat rendering."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], chat_template: str | None,
                 add_bos: bool):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.add_bos = bool(add_bos) and bos_id is not None
        self._specials: dict[str, int] = backend.special_tokens  # control token text -> id
        self._special_ids = set(self._specials.values())
        self._special_pattern = _alternation(self._specials)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

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
        open_mark, close_mark = _fresh_markers()
        shielded = _shielded(messages, self._special_pattern, open_mark, close_mark)
        rendered = self._render(shielded, add_generation_prompt)
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
        from jinja2 import TemplateError

        if not self.chat_template:
            raise ChatTemplateError("model has no chat template; use `arbor generate` for plain completion")
        try:
            return _compiled_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id) or "",
                eos_token=self._token_text(self.eos_ids[0] if self.eos_ids else None) or "")
        except (TemplateError, TypeError) as e:  # TypeError: e.g. a template adding None to a string
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def _encode_shielded(self, rendered: str, open_mark: str, close_mark: str) -> list[int]:
        pieces = re.split(f"{re.escape(open_mark)}(.*?){re.escape(close_mark)}", rendered, flags=re.DOTALL)
        ids, plain = [], ""
        for index, piece in enumerate(pieces):
            if index % 2:  # odd pieces are control-token spellings from a message: text
                plain += piece
                continue
            piece = piece.replace(open_mark, "").replace(close_mark, "")  # a marker the template cut apart
            for text, special_id in _split_on_specials(piece, self._special_pattern, self._specials):
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


class _HFTokenizersBackend:
    """A `tokenizers.Tokenizer`: a tokenizer.json, or a GGUF byte-level BPE rebuilt as one."""

    def __init__(self, tok):
        from tokenizers import Tokenizer as RustTokenizer

        self._with_specials = tok
        self._plain = RustTokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True  # a control token typed in text stays text
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._plain.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._plain.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._plain.id_to_token(token_id)

    def adds_bos(self, bos_id: int) -> bool:
        """Whether tokenizer.json's post-processor puts BOS first (its way of saying add_bos_token)."""
        return self._with_specials.encode("a", add_special_tokens=True).ids[:1] == [bos_id]

    def save(self, directory: Path) -> str:
        self._with_specials.save(str(directory / "tokenizer.json"))
        return "PreTrainedTokenizerFast"


class _SentencePieceBackend:
    """A sentencepiece model: a tokenizer.model, or a GGUF 'llama' vocabulary rebuilt as one."""

    def __init__(self, proto):
        import sentencepiece

        self._proto = proto
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (RuntimeError, OSError) as e:
            raise CorruptModelError(f"sentencepiece rejected the tokenizer model ({e}); {_REPULL}") from None
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == CONTROL}
        self.vocab_size = len(proto.pieces)
        # sentencepiece drops the leading space of the first piece it decodes (the dummy prefix).
        self._drops_first_space = proto.normalizer_spec.add_dummy_prefix

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)  # sentencepiece never matches CONTROL pieces in text

    def encode_with_specials(self, text: str) -> list[int]:
        # Each run of text after a control token gets its own dummy-prefix space, as in llama.cpp.
        ids = []
        for plain, special_id in _split_on_specials(text, _alternation(self.special_tokens), self.special_tokens):
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

    def adds_bos(self, bos_id: int) -> bool:
        return True  # what LlamaTokenizer does when tokenizer_config.json does not say

    def save(self, directory: Path) -> str:
        (directory / "tokenizer.model").write_bytes(self._proto.SerializeToString())
        return "LlamaTokenizer"


def _alternation(specials: dict[str, int]):
    """A regex matching any control token; longest first, so "<|im_end|>" wins over a prefix of it."""
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def _split_on_specials(text: str, pattern, specials: dict[str, int]):
    """(text before, id) for each control token in text, then (rest, None)."""
    start = 0
    for match in pattern.finditer(text) if pattern else ():
        yield text[start:match.start()], specials[match.group()]
        start = match.end()
    yield text[start:], None


def _fresh_markers() -> tuple[str, str]:
    # Private-use characters plus a per-call nonce: a message cannot contain a marker by chance or on purpose.
    nonce = secrets.token_hex(8)
    return f"\ue000{nonce}\ue001", f"\ue001{nonce}\ue000"


def _shielded(value, pattern, open_mark: str, close_mark: str):
    """A copy of messages with every control-token spelling in their strings wrapped in markers."""
    if pattern is None:
        return value
    if isinstance(value, str):
        return pattern.sub(lambda m: open_mark + m.group() + close_mark, value)
    if isinstance(value, dict):
        return {key: _shielded(item, pattern, open_mark, close_mark) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shielded(item, pattern, open_mark, close_mark) for item in value]
    return value


@lru_cache(maxsize=8)
def _compiled_template(source: str):
    """The template compiled in the jinja environment HF renders chat templates in, but with a
    sandbox that fails loudly: the stock one renders a forbidden attribute as empty text."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LoudSandbox(ImmutableSandboxedEnvironment):
        # a template that reaches for `__class__` is hostile or broken: either way, no prompt from it
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"template tried to access {attribute!r} of a {type(obj).__name__} object")

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes "<" and ">", which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = LoudSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None


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
    return Tokenizer(backend, bos_id=bos_id, eos_ids=_eos_ids(backend, declared, template),
                     chat_template=template, add_bos=add_bos)


def _backend_from_directory(directory: Path):
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return _HFTokenizersBackend(RustTokenizer.from_file(str(directory / "tokenizer.json")))
        except Exception as e:  # noqa: BLE001 -- tokenizers reports every parse problem as a bare Exception
            raise CorruptModelError(f"{directory / 'tokenizer.json'} is not a valid tokenizer ({e}); "
                                    f"{_REPULL}") from None
    if (directory / "tokenizer.model").is_file():
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2

        try:
            proto = sentencepiece_model_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
        except DecodeError as e:
            raise CorruptModelError(f"{directory / 'tokenizer.model'} is not a sentencepiece model ({e}); "
                                    f"{_REPULL}") from None
        return _SentencePieceBackend(proto)
    raise CorruptModelError(f"{directory} has no tokenizer.json or tokenizer.model; {_REPULL}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not valid JSON ({e}); {_REPULL}") from None
    if not isinstance(value, dict):
        raise CorruptModelError(f"{path} should hold a JSON object; {_REPULL}")
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


def _eos_ids(backend, declared: list, template: str | None) -> list[int]:
    """Declared eos ids, then end-of-turn tokens the template writes: both must stop generation."""
    turn_ends = [backend.token_to_id(t) for t in _END_OF_TURN_TOKENS if template and t in template]
    ids = [i for i in [*declared, *turn_ends] if isinstance(i, int)]
    return list(dict.fromkeys(ids))


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """The tokenizer a GGUF file describes; `meta` maps its metadata keys to Python values."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"tokenizer.ggml.model {kind!r} is not supported (arbor reads 'gpt2' and 'llama')")
    if not meta.get("tokenizer.ggml.tokens"):
        raise CorruptModelError(f"GGUF metadata has no tokenizer.ggml.tokens; {_REPULL}")
    backend = _byte_level_bpe_from_gguf(meta) if kind == "gpt2" else _sentencepiece_from_gguf(meta)
    template = meta.get("tokenizer.chat_template")
    declared = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_ids=_eos_ids(backend, declared, template), chat_template=template, add_bos=add_bos)


def _token_types(meta: dict) -> list[int]:
    tokens = meta["tokenizer.ggml.tokens"]
    return list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))


def _byte_level_bpe_from_gguf(meta: dict) -> _HFTokenizersBackend:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RustTokenizer

    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CorruptModelError(f"GGUF metadata has a BPE vocabulary but no tokenizer.ggml.merges; {_REPULL}")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    model = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                       merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in _IGNORE_MERGES_PRE)
    tok = RustTokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # Whole-token matching for control and user-defined tokens; ids stay those of the vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return _HFTokenizersBackend(tok)


def _byte_level_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # llama.cpp and SmolLM's own tokenizer.json: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_from_gguf(meta: dict) -> _SentencePieceBackend:
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    if UNKNOWN not in types and 0 <= unk_id < len(types):
        types[unk_id] = UNKNOWN  # sentencepiece refuses a model without exactly one unknown piece
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = BYTE in types
    proto.trainer_spec.unk_id = unk_id
    proto.trainer_spec.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    proto.trainer_spec.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    # llama.cpp's SPM tokenizer: no normalization, spaces as U+2581, optional leading space.
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind if 1 <= kind <= 6 else NORMAL)
    return _SentencePieceBackend(proto)
