"""r1reward.cache: entries are built aside and renamed, reused once complete; the generated
data set is one such entry (r1reward.data.generated_split)."""
import pytest

from r1reward.cache import build_once, cache_root, write_atomically
from r1reward.data import DATA_VERSION, generate_dataset, generated_split


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("R1REWARD_CACHE")
    assert cache_root().parts[-2:] == (".cache", "r1reward")


def test_build_once_builds_aside_and_reuses(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        assert d != tmp_path / "entry" and d.parent == tmp_path  # aside, on the same disk
        (d / "part").write_text("x")
        (d / "done").write_text("ok")

    assert build_once(tmp_path / "entry", build, marker="done") == tmp_path / "entry"
    assert build_once(tmp_path / "entry", build, marker="done") == tmp_path / "entry"
    assert len(calls) == 1 and (tmp_path / "entry" / "part").read_text() == "x"

    def interrupted(d):
        (d / "part").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "other", interrupted, marker="done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # nothing half-built left
    with pytest.raises(RuntimeError, match="did not write done"):
        build_once(tmp_path / "other", lambda d: None, marker="done")
    # a stale directory without the marker (an old crash) is replaced
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "junk").write_text("?")
    build_once(tmp_path / "stale", build, marker="done")
    assert sorted(p.name for p in (tmp_path / "stale").iterdir()) == ["done", "part"]


def test_write_atomically(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    write_atomically(target, lambda p: p.write_bytes(b"abc"))
    assert target.read_bytes() == b"abc"

    def fail(p):
        p.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"abc" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_generated_split_is_cached_under_the_trainers_key(tmp_path, monkeypatch):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    train, held = generated_split(6, 4, 2, "color, shape")
    root = tmp_path / "cache" / "data" / f"gen-v{DATA_VERSION}-s2-n6-h4-color_shape"
    assert (train, held) == (root / "train.jsonl", root / "heldout.jsonl")
    stamp = held.stat().st_mtime_ns
    assert generated_split(6, 4, 2, ("color", "shape")) == (train, held)
    assert held.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # the same bytes generate_dataset writes for the same arguments
    t2, h2 = generate_dataset(tmp_path / "direct", 6, 4, seed=2, kinds=("color", "shape"))
    assert train.read_bytes() == t2.read_bytes() and held.read_bytes() == h2.read_bytes()
    with pytest.raises(ValueError, match="kinds"):
        generated_split(2, 2, 0, "colour")
    assert not list((tmp_path / "cache" / "data").glob(".*"))  # the failed build left nothing
