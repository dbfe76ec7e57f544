"""The formation-rate screen: one probe per seed in subprocesses, counted per kind."""
import json

import pytest

from r1reward import sft_screen


def test_seed_specs_expand_and_bad_ones_are_named():
    assert sft_screen.parse_seeds("3-5,9,4") == [3, 4, 5, 9]
    for bad in ("", "a", "5-3", "1-x"):
        with pytest.raises(ValueError, match="--seeds"):
            sft_screen.parse_seeds(bad)


def _reading(step, color, shape):
    acc = {"all": (color + shape) / 2, "color": color, "shape": shape, "color/circle": color}
    return {"step": step, "groups": {k: {"accuracy": a} for k, a in acc.items()}}


def test_a_kind_counts_as_formed_only_above_the_chance_margin():
    s = sft_screen.summarize({3: _reading(3000, 0.95, 0.55), 4: _reading(3000, 0.58, 0.80),
                              5: _reading(3000, 0.30, 0.90)})
    assert [s["seeds"][k]["formed"] for k in (3, 4, 5)] == [["color"], ["color", "shape"], ["shape"]]
    assert s["formed"] == {"color": 2, "shape": 2} and s["all_formed"] == 1 and s["n"] == 3
    assert "color 2/3, shape 2/3; every kind: 1/3" in sft_screen.table(s)


def _screen(out, seeds, *probe_flags):
    return sft_screen.main(["--output", str(out), "--seeds", seeds, "--jobs", "2", "--",
                            "--steps", "2", "--copy-warmup", "0", "--every", "2", "--n-train", "8",
                            "--n-heldout", "2", "--kinds", "color,shape", *probe_flags])


def test_screen_runs_each_seed_once_and_resumes(tiny_dir, tmp_path, capsys):
    assert _screen(tmp_path, "0-1") == 0
    summary = json.loads((tmp_path / "screen.json").read_text())
    assert summary["n"] == 2 and set(summary["seeds"]) == {"0", "1"}
    assert set(summary["formed"]) == {"color", "shape"} and summary["failed"] == []
    assert all(v["step"] == 2 for v in summary["seeds"].values())
    out = capsys.readouterr().out
    assert "| seed | all | color | shape | formed |" in out
    # probes run one thread each, on this process's numeric paths, and the screen says so
    assert summary["machine"]["torch_threads"] == 1 and "1 threads; ATen" in out
    probe = tmp_path / "seed_0" / "probe.jsonl"
    before = probe.stat().st_mtime_ns
    assert _screen(tmp_path, "0-1") == 0  # both seeds done: read back, not rerun
    assert probe.stat().st_mtime_ns == before
    assert _screen(tmp_path, "0", "--lr", "1e-3") == 0
    assert probe.stat().st_mtime_ns != before  # other flags: the seed is probed again


def test_a_failed_probe_is_reported_with_its_log_and_the_rest_kept(tiny_dir, tmp_path, capsys):
    args = ["--output", str(tmp_path), "--seeds", "0", "--", "--kinds", "smell"]
    assert sft_screen.main(args) == 1
    err = capsys.readouterr().err
    assert "seed 0: the probe exited with 2" in err and "log.txt" in err
    assert "--kinds" in (tmp_path / "seed_0" / "log.txt").read_text()
    assert json.loads((tmp_path / "screen.json").read_text())["failed"]


@pytest.mark.parametrize("probe_flag", ["--seed", "--output", "--overwrite"])
def test_flags_the_screen_sets_are_refused_after_the_separator(tmp_path, probe_flag, capsys):
    with pytest.raises(SystemExit):
        sft_screen.main(["--output", str(tmp_path), "--", probe_flag, "1"])
    assert probe_flag in capsys.readouterr().err
