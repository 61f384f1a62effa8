"""The structured-output validity suite's cases (issue 29): 50 JSON schemas x prompts built from ten subjects'
fields in five shapes, plus four `json_object` prompts, and the judge every backend's answers face.

Each subject has fields of every kind the issue names (strings with a pattern or a length bound, integers with
bounds, enums, booleans, arrays with minItems/maxItems, a nested object); a shape picks which of them a schema
holds and how: flat, with an array, nested, a list of objects, or with optional fields. Every schema has
`additionalProperties: false` on each object and bounds every string, array and integer, so a valid answer
fits `MAX_TOKENS` (an answer cut short would not parse, and would fail the suite as it should). The prompts
name the keys, as a user would, but never the bounds or patterns: without the mask the model's answers are
free to break them (the control, tests/test_schema_validity.py). Odd cases sample (temperature 1, seeded),
even ones are greedy. `jsonschema` judges: it shares no code with llguidance.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_TOKENS = 96  # per answer: every valid answer of the schemas below is well within it


def text(max_length: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def pattern(regex: str) -> dict:
    return {"type": "string", "pattern": regex}


def integer(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def enum(*values) -> dict:
    return {"enum": list(values)}


def array(items: dict, low: int, high: int) -> dict:
    return {"type": "array", "items": items, "minItems": low, "maxItems": high}


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


NAME = pattern("^[A-Z][a-z]{1,11}$")
BOOL = {"type": "boolean"}

# subject: (scalars: three fields, a pattern, an integer and an enum among them; a boolean; an array; a nested object)
SUBJECTS = {
    "person": ({"name": NAME, "age": integer(0, 120), "job": enum("teacher", "doctor", "farmer", "artist")},
               ("married", BOOL), ("hobbies", array(enum("reading", "music", "sport", "cooking"), 1, 3)),
               ("address", obj({"city": text(20), "zip": pattern("^[0-9]{5}$")}))),
    "city": ({"city": text(24), "population": integer(1000, 40000000), "continent": enum(
                 "Europe", "Asia", "Africa", "America", "Oceania")},
             ("capital", BOOL), ("landmarks", array(text(24), 1, 2)),
             ("mayor", obj({"name": NAME, "since": integer(1990, 2030)}))),
    "book": ({"title": text(30), "year": integer(1450, 2030), "genre": enum("novel", "poetry", "history", "science")},
             ("bestseller", BOOL), ("themes", array(enum("love", "war", "family", "power", "nature"), 1, 3)),
             ("author", obj({"first": NAME, "last": NAME}))),
    "film": ({"title": text(30), "minutes": integer(60, 240), "rating": enum("G", "PG", "PG-13", "R")},
             ("colour", BOOL), ("actors", array(NAME, 2, 3)),
             ("studio", obj({"name": text(20), "country": pattern("^[A-Z]{2}$")}))),
    "product": ({"sku": pattern("^[A-Z]{3}-[0-9]{4}$"), "price_cents": integer(1, 1000000),
                 "category": enum("food", "toys", "tools", "books")},
                ("in_stock", BOOL), ("sizes", array(enum("S", "M", "L", "XL"), 1, 4)),
                ("maker", obj({"name": text(20), "founded": integer(1800, 2030)}))),
    "recipe": ({"dish": text(24), "servings": integer(1, 12), "difficulty": enum("easy", "medium", "hard")},
               ("vegetarian", BOOL), ("ingredients", array(text(16), 2, 4)),
               ("timing", obj({"prep_minutes": integer(0, 180), "cook_minutes": integer(0, 480)}))),
    "event": ({"name": text(30), "date": pattern("^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"),
               "kind": enum("concert", "match", "fair", "lecture")},
              ("free", BOOL), ("days", array(enum("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), 1, 3)),
              ("venue", obj({"hall": text(20), "seats": integer(10, 100000)}))),
    "company": ({"name": text(24), "employees": integer(1, 500000), "sector": enum("energy", "retail", "software",
                                                                                   "banking")},
                ("listed", BOOL), ("offices", array(text(16), 1, 3)),
                ("ceo", obj({"name": NAME, "age": integer(25, 90)}))),
    "planet": ({"name": NAME, "moons": integer(0, 100), "kind": enum("rocky", "gas giant", "ice giant", "dwarf")},
               ("has_rings", BOOL), ("gases", array(enum("hydrogen", "helium", "methane", "nitrogen", "oxygen"), 1, 3)),
               ("orbit", obj({"days": integer(1, 100000), "order": integer(1, 9)}))),
    "song": ({"title": text(30), "seconds": integer(30, 900), "key": pattern("^[A-G](#|b)? (major|minor)$")},
             ("live", BOOL), ("instruments", array(enum("guitar", "piano", "drums", "violin", "bass"), 1, 3)),
             ("artist", obj({"name": text(20), "debut": integer(1900, 2030)}))),
}
SHAPES = ("flat", "array", "nested", "list", "optional")


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    schema: dict | None  # None: OpenAI's json_object (any JSON object)
    temperature: float
    seed: int | None

    @property
    def schema_option(self):
        """What Model's `schema=` takes for this case."""
        return "json_object" if self.schema is None else self.schema

    @property
    def response_format(self) -> dict:
        """OpenAI's response_format for this case (strict json_schema, or json_object)."""
        if self.schema is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name.replace(" ", "_"), "schema": self.schema,
                                                       "strict": True}}


def _shape(subject: str, shape: str) -> tuple[dict, str]:
    scalars, (flag, flag_schema), (many, many_schema), (inner, inner_schema) = SUBJECTS[subject]
    first, second, third = scalars
    article = "an" if subject[0] in "aeiou" else "a"
    if shape == "flat":
        schema = obj(scalars)
    elif shape == "array":
        schema = obj({first: scalars[first], many: many_schema})
    elif shape == "nested":
        schema = obj({first: scalars[first], inner: inner_schema, third: scalars[third]})
    elif shape == "list":
        item = obj({first: scalars[first], second: scalars[second]})
        return obj({"items": array(item, 1, 2)}), (f"List one or two {subject}s as JSON: an object with 'items', "
                                                  f"each with {first} and {second}.")
    else:  # optional: only the first key required, a boolean among them
        schema = obj({first: scalars[first], flag: flag_schema, second: scalars[second]}, required=[first])
    keys = ", ".join(schema["properties"])
    return schema, f"Describe {article} {subject} as JSON with the keys {keys}."


JSON_OBJECT_PROMPTS = [
    "What is the capital of France? Answer as a JSON object with one key, answer.",
    "Give the boiling point of water in Celsius as a JSON object.",
    "Name three primary colours in a JSON object with the key colours.",
    "Describe a cat in a JSON object with the keys name and age.",
]


def cases() -> list[Case]:
    out = []
    for shape in SHAPES:
        for subject in SUBJECTS:
            i = len(out)
            schema, prompt = _shape(subject, shape)
            out.append(Case(f"{subject} {shape}", prompt, schema, 1.0 if i % 2 else 0.0, i if i % 2 else None))
    for j, prompt in enumerate(JSON_OBJECT_PROMPTS):
        i = len(out)
        out.append(Case(f"json_object {j}", prompt, None, 1.0 if i % 2 else 0.0, i if i % 2 else None))
    return out


ANY_OBJECT = {"type": "object"}


def judge(text: str, schema: dict | None) -> str:
    """'valid', 'invalid' (JSON that breaks the schema) or 'unparsable' (not one JSON value)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "unparsable"
    validator = jsonschema.Draft202012Validator(ANY_OBJECT if schema is None else schema)
    return "valid" if validator.is_valid(value) else "invalid"


def first_json(text: str) -> str:
    """The first {...} of a free answer (inside a ```json fence or not): the control's kinder reading."""
    start = text.find("{")
    if start < 0:
        return text
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return text[start:]
    return json.dumps(value)


def check_cases_are_distinct(all_cases: list[Case]) -> None:
    texts = {json.dumps(c.schema, sort_keys=True) for c in all_cases if c.schema is not None}
    assert len(texts) == sum(c.schema is not None for c in all_cases)
    assert len({c.prompt for c in all_cases}) == len(all_cases)
    assert all(re.fullmatch(r"[\w ]+", c.name) for c in all_cases)
