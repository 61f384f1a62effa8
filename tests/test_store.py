"""The model cache: atomic, locked installs, listing and removing, where it lives, progress on stderr."""

from __future__ import annotations

import threading
import time

import pytest
from gguf_files import count_conversions

import arbor_weights
from arbor_core.errors import ModelNotFoundError
from arbor_weights import gguf_import, store

pytestmark = pytest.mark.usefixtures("arbor_home")


# ---- atomic, locked installs --------------------------------------------------------------------

@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_install_leaves_no_model_and_no_temp_dir(tiny_gguf, monkeypatch, failure):
    def fail(*args, **kwargs):  # after model.safetensors is written: mid-install
        raise failure

    monkeypatch.setattr(gguf_import, "write_provenance", fail)
    with pytest.raises(type(failure)):
        arbor_weights.resolve(str(tiny_gguf), quiet=True)
    assert list((arbor_weights.cache_dir() / "models").iterdir()) == []


def run_in_threads(target, count: int) -> list[BaseException]:
    """Run `target` in `count` threads at once; what any of them raised (a thread's exception would
    otherwise be lost)."""
    errors: list[BaseException] = []

    def guarded():
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_failed_forced_reinstall_keeps_the_previous_install(tiny_gguf, monkeypatch):
    before = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    monkeypatch.setattr(gguf_import, "write_provenance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        arbor_weights.pull(str(tiny_gguf), quiet=True, force=True)
    assert arbor_weights.open_checkpoint(before.path).path == before.path
    assert [p.name for p in (arbor_weights.cache_dir() / "models").iterdir()] == [before.path.name]


def test_concurrent_pulls_of_one_gguf_convert_once(tiny_gguf, monkeypatch):
    calls = count_conversions(monkeypatch)
    results = []

    def pull():
        results.append(arbor_weights.resolve(str(tiny_gguf), quiet=True).path)

    errors = run_in_threads(pull, 2)
    assert errors == []
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


# ---- the cache ---------------------------------------------------------------------------------

def test_cache_dir_follows_arbor_home(arbor_home):
    assert arbor_weights.cache_dir() == arbor_home


def test_list_and_remove_models(tiny_gguf):
    checkpoint = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    (arbor_weights.cache_dir() / "models" / f".tmp-{checkpoint.name}+stale").mkdir()
    [entry] = arbor_weights.list_models()
    assert entry["name"] == checkpoint.name and entry["path"] == str(checkpoint.path)
    assert entry["size_bytes"] > 0 and entry["source"] == f"gguf:{tiny_gguf}"
    assert entry["parameters"] == checkpoint.config.num_parameters() and entry["trained_context"] == 512
    assert arbor_weights.resolve(checkpoint.name, quiet=True).path == checkpoint.path  # by installed name
    arbor_weights.remove_model(checkpoint.name)
    assert arbor_weights.list_models() == []
    with pytest.raises(ModelNotFoundError):
        arbor_weights.remove_model(checkpoint.name)


def test_remove_refuses_names_that_are_paths():
    with pytest.raises(ModelNotFoundError):
        arbor_weights.remove_model("../etc")


# ---- what the user sees -----------------------------------------------------------------------

def test_progress_goes_to_stderr_only_and_quiet_is_silent(tiny_gguf, capsys):
    arbor_weights.resolve(str(tiny_gguf), quiet=True)
    assert capsys.readouterr() == ("", "")
    arbor_weights.pull(str(tiny_gguf), force=True)  # stderr is not a terminal here: one line per stage
    out, err = capsys.readouterr()
    assert out == "" and f"arbor: converting {tiny_gguf.name}" in err and "\r" not in err


# ---- lock files exist only while held -----------------------------------------------------------

def test_failed_install_leaves_no_lock_file(tiny_gguf, monkeypatch):
    monkeypatch.setattr(gguf_import, "write_provenance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        arbor_weights.resolve(str(tiny_gguf), quiet=True)
    assert not (arbor_weights.cache_dir() / "locks").exists()


def test_lock_file_is_there_while_held_and_gone_after(tiny_gguf):
    lock_file = arbor_weights.cache_dir() / "locks" / "some-model.lock"
    with store.held_lock("some-model"):
        assert lock_file.is_file()
        with store.held_lock("other-model"):  # locks/ stays while another name is held
            pass
        assert lock_file.is_file()
    assert not lock_file.exists() and not lock_file.parent.exists()


def test_held_lock_excludes_while_holders_delete_the_file():
    # Holders unlink the file on release: a waiter on the old file must not share the lock with a newcomer.
    inside, overlaps, done = [], [], []

    def worker():
        for _ in range(200):
            with store.held_lock("contended"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.0002)
                inside.pop()
            done.append(1)

    errors = run_in_threads(worker, 4)
    assert errors == [] and overlaps == [] and len(done) == 800
    assert not (arbor_weights.cache_dir() / "locks").exists()


def test_lock_if_free_takes_a_free_lock_and_never_waits_for_a_held_one():
    lock_file = arbor_weights.cache_dir() / "locks" / "building.lock"
    with store.lock_if_free("building") as free:
        assert free and lock_file.is_file()
        with store.lock_if_free("building") as again:  # held (here by another descriptor, as by another process)
            assert not again
        assert lock_file.is_file()  # the refused try leaves the holder's file alone
    assert not lock_file.exists()
    with store.held_lock("building"), store.lock_if_free("building") as free:
        assert not free
    with store.lock_if_free("building") as free:
        assert free
