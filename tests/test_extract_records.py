"""`arbor extract` (arbor_cli/extract_records.py): records of a schema from every part of documents, each kept
only when grounded in its part. The fast tests use ask_door's word tokenizer and a fake door whose answer is a
function of the part it is given (what a model that reads the part would say, plus what it invents); the slow
test runs the default model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from ask_door import WordTokenizer, kjv_like

from arbor_cli.constrained import SchemaError
from arbor_core.errors import UsageError
from arbor_cli.documents import Document, read_document
from arbor_cli.extract_records import answered_items, extract_records, ground, items_schema, prompt_ids
from arbor_cli.generate import GenerationResult

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
          "required": ["name", "role"], "additionalProperties": False}
PLANTED = re.compile(r"Name: (\w+ \w+), role: (\w+)")


class ExtractModel:
    """The door extract uses, on words: `answer(part)` is the reply's items for the part the prompt holds.
    Records each part it was given and the schema each answer was held to."""

    def __init__(self, answer, trained: int = 4096):
        self.tokenizer = WordTokenizer()
        self.config = SimpleNamespace(trained_context=trained)
        self.answer_for = answer
        self.parts: list[str] = []
        self.schemas: list[str] = []

    def chat(self, messages, *, max_new_tokens=256, temperature=0.0, schema=None, **_):
        part, _, self.instruction = messages[-1]["content"].partition("\n\n---\n")
        self.parts.append(part)
        self.schemas.append(schema)
        return GenerationResult(json.dumps({"items": self.answer_for(part)}), [], "eos", {}, 0)

    def map(self, work, items, on_done=None):
        from arbor_cli.mapping import map_in_order

        return map_in_order(work, items, on_done)

    def kv_bytes_per_token(self):
        return None  # keeps no cache here, as an engine: every part is sent whole


def reads_people(part: str) -> list[dict]:
    return [{"name": n, "role": r} for n, r in PLANTED.findall(part)]


def reads_and_invents(part: str) -> list[dict]:
    return reads_people(part) + [{"name": "Zed Invented", "role": "wizard"}]


def people_text(names: list[str], paragraphs: int = 40) -> str:
    prose = kjv_like(paragraphs)
    for i, name in enumerate(names):
        prose.insert(1 + i * (paragraphs // max(len(names), 1)), f"Name: {name}, role: clerk{i}.")
    return "\n\n".join(prose)


def test_an_invented_item_is_dropped_and_counted_and_kept_items_point_at_their_sentence():
    text = people_text(["Alice Moreno", "Bashir Khan"], paragraphs=6)
    model = ExtractModel(reads_and_invents)
    result = extract_records(model, [Document("d.txt", text)], PERSON)
    assert [i["name"] for i in result.items] == ["Alice Moreno", "Bashir Khan"]
    assert result.dropped == result.parts == 1  # the invented one, once per part
    for item in result.items:
        source = item["_source"]
        assert source["document"] == "d.txt" and source["location"] is None
        assert text[source["start"]:source["end"]] == f"{item['name']}, role: {item['role']}"


def test_the_answer_is_held_to_items_of_the_users_schema():
    model = ExtractModel(reads_people)
    extract_records(model, [Document("d.txt", people_text(["Alice Moreno"], 4))], json.dumps(PERSON))
    wrapped = json.loads(model.schemas[0])
    assert wrapped["required"] == ["items"] and wrapped["properties"]["items"]["items"] == PERSON


def test_items_read_twice_in_overlapping_parts_are_merged_once():
    names = [f"Person{chr(65 + i)} Surname{chr(65 + i)}" for i in range(12)]
    text = people_text(names, paragraphs=48)
    model = ExtractModel(reads_people)
    result = extract_records(model, [Document("d.txt", text)], PERSON, part_tokens=160)
    assert result.parts == len(model.parts) > 3
    read = sum(len(reads_people(p)) for p in model.parts)
    assert read > len(names)  # some sentence lay in two parts' overlap ...
    assert sorted(i["name"] for i in result.items) == sorted(names)  # ... and is listed once
    assert result.merged == read - len(names) and result.dropped == 0
    for item in result.items:  # spans are in the document's own text, whatever part they came from
        assert text[item["_source"]["start"]:].startswith(item["name"])


def test_the_same_record_in_two_documents_is_kept_in_each():
    text = people_text(["Alice Moreno"], paragraphs=4)
    result = extract_records(ExtractModel(reads_people), [Document("a.txt", text), Document("b.txt", "\n\n" + text)],
                             PERSON)
    assert [(i["_source"]["document"], i["_source"]["start"] - text.index("Alice")) for i in result.items] == [
        ("a.txt", 0), ("b.txt", 2)]  # each in its own document's text
    assert result.merged == 0 and result.parts == 2


def test_locations_are_markdown_headings(tmp_path):
    path = tmp_path / "team.md"
    path.write_text("# Staff\n\nThe team met in March.\n\nName: Alice Moreno, role: engineer.\n\n# Partners\n\n"
                    "The river ran high.\n\nName: Chen Wei, role: accountant.\n")
    document = read_document(str(path), 1 << 20, print)
    result = extract_records(ExtractModel(reads_people), [document], PERSON)
    assert [(i["name"], i["_source"]["location"]) for i in result.items] == [
        ("Alice Moreno", "§ Staff"), ("Chen Wei", "§ Partners")]


def test_locations_are_pdf_pages(tmp_path):
    pytest.importorskip("pypdfium2")
    pytest.importorskip("reportlab")
    from doc_files import reportlab_pdf

    prose = kjv_like(6)
    path = tmp_path / "report.pdf"
    path.write_bytes(reportlab_pdf([[prose[0], "Name: Alice Moreno, role: engineer.", prose[1]],
                                    [prose[2], prose[3]], [prose[4], "Name: Chen Wei, role: accountant."]]))
    document = read_document(str(path), 1 << 24, print)
    result = extract_records(ExtractModel(reads_people), [document], PERSON)
    assert [(i["name"], i["_source"]["location"]) for i in result.items] == [
        ("Alice Moreno", "p. 1"), ("Chen Wei", "p. 3")]


@pytest.mark.parametrize("item, grounded", [
    ({"name": "alice  moreno", "role": "Engineer"}, True),   # case and whitespace aside
    ({"name": "Alice Moreno", "role": "engineer", "year": 2019}, True),
    ({"name": "Alice Moreno", "role": "engineer", "year": 2018}, False),  # a number not written there
    ({"name": "Alice Moreno", "role": "engineer", "year": 201}, False),   # nor a piece of one
    ({"name": "Alice More", "role": "engineer"}, False),  # a word cut short is not the word
    ({"name": "", "role": ""}, False),                    # nothing to ground it by
    ({"name": "Alice Moreno", "role": "pilot"}, False),   # both in the part, but paragraphs apart
])
def test_grounding_rules(item, grounded):
    part = "In 2019 the team grew.\nName: Alice   Moreno, role: engineer.\n\nThe pilot flew home."
    assert (ground(item, part, quote_field=False) is not None) == grounded


def test_the_record_is_found_where_its_values_stand_together_not_where_one_first_occurs():
    part = "The accountant came early.\n\nName: Chen Wei, role: accountant."
    start, end = ground({"name": "Chen Wei", "role": "accountant"}, part, quote_field=False)
    assert part[start:end] == "Chen Wei, role: accountant"


def test_a_quote_field_alone_grounds_the_item():
    part = "Name: Alice Moreno, role: engineer."
    assert ground({"quote": "Alice Moreno, role: engineer", "summary": "an engineer named Alice"}, part, True)
    assert ground({"quote": "Alice Moreno is great", "summary": "Alice"}, part, True) is None


def test_a_streamed_answer_stops_at_the_first_repeated_item():
    from arbor_cli.extract_records import answer_text

    taken = []

    def pieces():
        for piece in ['{"items": [', '{"name": "A", "role": "b"}', ", ", '{"name": "C", "role": "d"}'] + \
                     [", ", '{"name": "A", "role": "b"}'] * 500 + ["]}"]:
            taken.append(piece)
            yield piece
    text = answer_text(pieces())
    assert len(taken) == 6  # the first repeat ends it
    assert answered_items(text) == [{"name": "A", "role": "b"}, {"name": "C", "role": "d"}, {"name": "A", "role": "b"}]
    assert answer_text(GenerationResult('{"items": []}', [], "eos", {}, 0)) == '{"items": []}'


def test_an_answer_cut_short_keeps_its_complete_items():
    assert answered_items('{"items": [{"name": "A", "role": "b"}, {"name": "C", "ro') == [{"name": "A", "role": "b"}]
    assert answered_items('{"items": []}') == []


@pytest.mark.parametrize("schema, message", [
    ('{"type": "objekt"}', "Invalid type"),
    ('{"type": "string"}', "needs an item schema"),
    ("not json", "not JSON"),
])
def test_a_bad_schema_is_refused(schema, message):
    with pytest.raises(SchemaError, match=message):
        items_schema(schema)


def _run_cli(monkeypatch, args, model):
    from typer.testing import CliRunner

    import arbor_cli.cli.extract as command
    from arbor_cli.cli import app

    monkeypatch.setattr(command, "load_model", lambda opts: model)
    return CliRunner().invoke(app, ["extract", *args])


def test_jsonl_prints_one_grounded_item_a_line(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text(people_text(["Alice Moreno", "Bashir Khan"], paragraphs=6))
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    r = _run_cli(monkeypatch, [str(path), "--schema", str(tmp_path / "person.json"), "--jsonl"],
                 ExtractModel(reads_and_invents))
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(i["name"], i["_source"]["document"]) for i in lines] == [("Alice Moreno", str(path)),
                                                                      ("Bashir Khan", str(path))]
    r = _run_cli(monkeypatch, [str(path), "--schema", json.dumps(PERSON)], ExtractModel(reads_and_invents))
    out = json.loads(r.stdout)
    assert len(out["items"]) == 2 and out["dropped"] == 1 and out["parts"] == 1


def test_the_cli_refuses_a_bad_schema_in_one_line_before_loading_a_model(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text("Name: Alice Moreno, role: engineer.")

    import arbor_cli.cli.extract as command

    def no_model(opts):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(command, "load_model", no_model)
    from typer.testing import CliRunner

    from arbor_cli.cli import app
    r = CliRunner().invoke(app, ["extract", str(path), "--schema", '{"type": "string"}'])
    assert r.exit_code != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "needs an item schema" in r.stderr


@pytest.mark.slow
def test_the_default_model_extracts_planted_people_and_every_item_is_grounded(default_model, tmp_path):
    people = {"Alice Moreno": "engineer", "Bashir Khan": "designer", "Chen Wei": "accountant"}
    prose = kjv_like(6)
    lines = [f"Name: {name}, role: {role}." for name, role in people.items()]
    text = "\n\n".join([prose[0], lines[0], prose[1], lines[1], prose[2], lines[2], prose[3]])
    result = extract_records(default_model, [Document("people.txt", text)], PERSON,
                             instruction="Extract every person with their role.")
    assert result.items, result  # it finds at least one; never that it finds all
    squeeze = " ".join(text.split()).lower()
    for item in result.items:  # grounded, checked here independently of the module's own rule
        assert item["name"] and item["role"], item
        assert " ".join(item["name"].split()).lower() in squeeze and item["role"].lower() in squeeze, item
        span = text[item["_source"]["start"]:item["_source"]["end"]].lower()
        assert item["name"].lower().split()[0] in span, item


def test_a_parts_cached_prefix_is_the_same_whatever_the_instruction_or_schema():
    tokenizer, part = WordTokenizer(), "Name: Alice Moreno, role: engineer.\n\nMore text here."
    other = {"type": "object", "properties": {"title": {"type": "string"}}}
    prefixes = set()
    for item, instruction in ((PERSON, "Extract every person."), (other, "Find the titles, all of them.")):
        ids, shared = prompt_ids(tokenizer, part, item, instruction)
        prefixes.add(tuple(ids[:shared]))
        assert tokenizer.decode(ids[shared:]).startswith(instruction.split()[0])  # what follows "---" is not cached
        assert tokenizer.decode(ids[:shared]).endswith("More text here . \n \n - - - \n")
    assert len(prefixes) == 1


def test_an_instruction_too_long_for_the_room_after_a_part_is_refused():
    with pytest.raises(UsageError, match="the instruction is too long"):
        prompt_ids(WordTokenizer(), "Some part.", PERSON, "word " * 300)


@pytest.mark.slow
def test_a_second_extraction_loads_every_parts_prefix_from_the_disk_cache(default_model_here, tmp_path):
    from arbor_cli import doc_cache

    people = {"Alice Moreno": "engineer", "Bashir Khan": "designer", "Chen Wei": "accountant"}
    prose = kjv_like(12)
    for i, (name, role) in enumerate(people.items()):
        prose.insert(1 + 4 * i, f"Name: {name}, role: {role}.")
    documents = [Document("people.txt", "\n\n".join(prose))]

    def run(**kw):
        return extract_records(default_model_here, documents, PERSON, part_tokens=256, max_new_tokens=48, **kw)
    first = run()
    assert first.parts >= 3 and first.cache == {"loaded": 0, "prefilled": first.parts}
    assert len(doc_cache.entries()) == first.parts
    second = run()
    assert second.cache == {"loaded": second.parts, "prefilled": 0}  # only each part's instruction ran
    assert second.to_json()["items"] == first.to_json()["items"]
    unkept = run(keep=False)
    assert unkept.cache == {"loaded": 0, "prefilled": unkept.parts} and unkept.items == first.items


def _chat_doc(monkeypatch, args, load_model, message):
    from typer.testing import CliRunner

    import arbor_cli.cli.chat as command
    from arbor_cli.cli import app

    monkeypatch.setattr(command, "load_model", load_model)
    return CliRunner().invoke(app, ["chat", *args], input=message)


def test_chat_doc_with_a_schema_answers_a_message_with_the_documents_grounded_records(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text(people_text(["Alice Moreno", "Bashir Khan"], paragraphs=6))
    model = ExtractModel(reads_and_invents)
    r = _chat_doc(monkeypatch, ["--doc", str(path), "--schema", json.dumps(PERSON)], lambda opts: model,
                  "Every clerk.\n")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [i["name"] for i in out["items"]] == ["Alice Moreno", "Bashir Khan"] and out["dropped"] == 1
    assert json.loads(model.schemas[0]) == json.loads(items_schema(PERSON)[0])
    assert model.instruction.startswith("Every clerk.")


@pytest.mark.parametrize("schema, message", [('{"type": "string"}', "needs an item schema"),
                                             ("json_object", "not json_object")])
def test_chat_doc_refuses_a_schema_that_is_not_a_record_in_one_line(tmp_path, monkeypatch, schema, message):
    path = tmp_path / "d.txt"
    path.write_text("Name: Alice Moreno, role: engineer.")

    def no_model(opts):
        raise AssertionError("the model was loaded")
    r = _chat_doc(monkeypatch, ["--doc", str(path), "--schema", schema], no_model, "Hi\n")
    assert r.exit_code == 2 and r.stdout == "" and message in r.stderr and r.stderr.strip().count("\n") == 0
