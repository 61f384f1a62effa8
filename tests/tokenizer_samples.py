"""Sample text, a chat template and GGUF-style metadata for the tokenizer tests."""

import random

# Text that exercises multi-byte characters: several byte tokens make up one character here.
MULTIBYTE = "Grüße 🙂👍🏽 from 東京 and 서울 — naïve café, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!"
# the texts every model's tokenizer is checked on against transformers (tests/reference)
REFERENCE_SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 'quoted' and (bracketed); done!",
    "code": ('def greet(name: str) -> str:\n    """Say hello."""\n    if not name:\n'
             '        raise ValueError("empty")\n    return f"Hello, {name}!"\n'),
    "whitespace": "a  b   c\t\td \n\n\n  e\r\n\tf    \n",
    "emoji": "Great job 🎉🙂👍🏽 family: 👨‍👩‍👧 flags 🇫🇷",
    "cjk": "東京は日本の首都です。中文测试，한국어 텍스트",
    "accents": "Crème brûlée, naïve façade, Ångström, Øresund, ß, ğ, İstanbul",
    "digits": "x=12; y=3.14 in 2024, pi≈3.14159, 1e-9, abc123def, #42",
    "control_text": "literal <|im_start|>user and <|endoftext|> stay text",
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_metadata(path) -> dict:
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def english_sentences(count=400):
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "cats", "sat", "on",
             "mats", "near", "old", "stone", "houses", "and", "rivers", "carry", "light", "tokens", "through"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?")
            for _ in range(count)]


def llama_cpp_token_type(sp, token_id: int) -> int:
    """llama.cpp's numbering: NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6."""
    if sp.IsUnknown(token_id):
        return 2
    if sp.IsControl(token_id):
        return 3
    if sp.IsUnused(token_id):
        return 5
    if sp.IsByte(token_id):
        return 6
    return 1
