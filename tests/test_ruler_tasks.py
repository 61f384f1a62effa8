"""The RULER-style task generator and its scoring (benchmarks/ruler_tasks.py): what each task plants, that
dev and held-out share nothing, and the issue's scoring rules. No model."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from arbor_cli.ask import NOT_FOUND


def _ruler_tasks():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ruler_tasks.py"
    spec = importlib.util.spec_from_file_location("ruler_tasks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ruler_tasks"] = module
    spec.loader.exec_module(module)
    return module


rt = _ruler_tasks()


@pytest.fixture(scope="module", params=rt.SETS)
def generator(request):
    return rt.Generator(request.param, 2048)


def test_the_not_found_answer_is_asks_own():
    assert rt.NOT_FOUND == NOT_FOUND


def test_dev_and_held_out_share_no_wording_no_needle_and_no_haystack():
    dev, held = rt.FORMATS["dev"], rt.FORMATS["held-out"]
    assert not {f.needle for f in dev} & {f.needle for f in held}
    assert not {q for f in dev for q in f.single + f.every} & {q for f in held for q in f.single + f.every}
    assert not set(rt.RECORDS["dev"].questions) & set(rt.RECORDS["held-out"].questions)
    assert not set(rt.sentences(rt.haystack_text("dev"))[:200]) & set(rt.sentences(rt.haystack_text("held-out")))


def test_each_task_plants_what_it_asks_about(generator):
    one = generator.task("one-key", 0, 4)
    assert one.text.count(one.expected[0]) == 1 and one.key in one.question and len(one.others) >= 4
    assert all(v in one.text for v in one.others)
    absent = generator.task("absent", 1, 4)
    assert absent.key not in absent.text and absent.key in absent.question and len(absent.others) >= 3
    multi = generator.task("multi-value", 2, 4)
    assert 2 <= len(multi.expected) <= 4 and all(multi.text.count(v) == 1 for v in multi.expected)
    assert multi.text.count(multi.key) == len(multi.expected)  # spread over the document, the key each time
    count = generator.task("count", 3, 4)
    records = rt.RECORDS[generator.set].record.split(":")[0] + ":"
    assert count.text.count(records) == int(count.expected[0]) and 5 <= int(count.expected[0]) <= 20
    passkey = generator.task("passkey", 0, 4)
    assert passkey.expected[0] in passkey.text and passkey.question == "What is the pass key?"


def test_tasks_are_the_same_for_the_same_seed_and_near_their_length(generator):
    a, b = generator.task("one-key", 1, 4), generator.task("one-key", 1, 4)
    assert a.text == b.text and a.question == b.question
    assert 1800 <= generator.count_tokens(a.text) <= 2600  # the default count: ~4 characters a token


def test_scoring_follows_the_issue():
    task = rt.Task("one-key", "dev", 0, 0.5, "", "Q?", ["1234567"], ["7654321"])
    assert rt.score(task, "It is 1234567.")["right"]
    wrong = rt.score(task, "It is 7654321.")
    assert not wrong["right"] and wrong["other"]
    absent = rt.Task("absent", "dev", 0, 0.5, "", "Q?", [], ["7654321"])
    assert rt.score(absent, NOT_FOUND)["right"] and not rt.score(absent, "It is 7654321.")["right"]
    multi = rt.Task("multi-value", "dev", 0, 0.5, "", "Q?", ["111", "222", "333"], ["999"])
    half = rt.score(multi, "2 found:\n- 111\n- 999")
    assert (half["found"], half["wrong"], half["right"]) == (1, 1, False)
    count = rt.Task("count", "dev", 0, 0.5, "", "Q?", ["7"])
    assert rt.score(count, "7.\n- a 12\n- b 3")["right"] and not rt.score(count, "There are 6.")["right"]
    assert not rt.score(count, NOT_FOUND)["right"]


def test_needles_are_sentences_of_their_own():
    text = rt.plant(["One sentence.", "Two sentence.\n\n", "Three."], [(0.5, "The needle is 5.")])
    assert re.search(r"(^|[.\s])The needle is 5\. ", text)
