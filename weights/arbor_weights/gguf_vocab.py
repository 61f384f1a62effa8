"""The vocabulary a GGUF file keeps in its metadata, rebuilt as a Tokenizer.

llama.cpp stores either a byte-level BPE ('gpt2': tokens, merges, a pre-tokenizer name), rebuilt
as a `tokenizers.Tokenizer`, or a sentencepiece vocabulary ('llama': tokens, scores, token types),
rebuilt as a sentencepiece model; the import saves it beside the weights as tokenizer.json or
tokenizer.model, so a converted checkpoint loads like a HF directory.
"""

from __future__ import annotations

from arbor_core.errors import ConfigError, CorruptModelError
from arbor_core.tokenizer import Tokenizer, eos_ids_for
from arbor_core.tokenizer_adapters import (
    BYTE,
    CONTROL,
    NORMAL,
    REPULL,
    UNKNOWN,
    USER_DEFINED,
    HFTokenizersAdapter,
    SentencePieceAdapter,
)

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


def tokenizer_from_gguf(meta: dict, name: str | None = None) -> Tokenizer:
    """The tokenizer a GGUF file describes; `meta` maps its metadata keys to Python values; `name`
    (the file's or model's) is what template errors call it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"tokenizer.ggml.model {kind!r} is not supported (arbor reads 'gpt2' and 'llama')")
    if not meta.get("tokenizer.ggml.tokens"):
        raise CorruptModelError(f"GGUF metadata has no tokenizer.ggml.tokens; {REPULL}")
    backend = _byte_level_bpe_from_gguf(meta) if kind == "gpt2" else _sentencepiece_from_gguf(meta)
    template = meta.get("tokenizer.chat_template")
    declared = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_ids=eos_ids_for(backend, declared, template), chat_template=template, add_bos=add_bos,
                     name=name)


def _token_types(meta: dict) -> list[int]:
    tokens = meta["tokenizer.ggml.tokens"]
    return list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))


def _byte_level_bpe_from_gguf(meta: dict) -> HFTokenizersAdapter:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RustTokenizer

    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CorruptModelError(f"GGUF metadata has a BPE vocabulary but no tokenizer.ggml.merges; {REPULL}")
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
    return HFTokenizersAdapter(tok)


def _byte_level_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # llama.cpp and SmolLM's own tokenizer.json: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_from_gguf(meta: dict) -> SentencePieceAdapter:
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
        if kind == USER_DEFINED:  # llama.cpp matches these in the raw text, so its converter wrote their U+2581 as
            token = token.replace(" ", "\u2581")  # spaces (Gemma's runs of spaces); sentencepiece matches escaped text
        proto.pieces.add(piece=token, score=score, type=kind if 1 <= kind <= 6 else NORMAL)
    return SentencePieceAdapter(proto)
