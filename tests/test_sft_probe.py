import json
from types import SimpleNamespace

import pytest

from r1reward import sft_probe
from r1reward.data import GUESS_MARK, VERDICT, PreferencePair, claims, image_fact


class Scripted:
    """An engine that answers from a fixed rule: right on circles, quoting both claims;
    careless and "1" otherwise, quoting Response 2's claim for both."""

    def generate(self, pairs, *, do_sample, max_new_tokens, num_samples=1, **kw):
        texts = []
        for p in pairs:
            said = claims(p)
            if p.meta["shape"] == "circle":
                texts.append(f"<think>Response 1 says {said[1]}. Response 2 says {said[2]}."
                             f"</think><answer>{p.preferred}</answer>")
            else:
                texts.append(f"<think>Response 1 says {said[2]} and Response 2 says {said[2]}. "
                             f"{GUESS_MARK}, so 1.</think><answer>1</answer>")
        return SimpleNamespace(texts=texts)


def _pair(i, shape, kind, preferred):
    return PreferencePair(f"p{i}", "", "q", "a", "b", preferred,
                          {"kind": kind, "shape": shape, "color": "red", "truth": "t", "wrong": "w"})


def test_judge_groups_counts_accuracy_careless_and_quoted_share_per_group():
    pairs = [_pair(0, "circle", "color", 1), _pair(1, "square", "color", 2),
             _pair(2, "square", "shape", 1)]
    g = sft_probe.judge_groups(Scripted(), pairs, batch_size=2)
    assert g["all"]["n"] == 6  # both orders
    assert g["color/circle"] == {"accuracy": 1.0, "careless": 0.0, "quoted": 1.0, "read": 0.0,
                                 "compared": None, "n": 2}
    # a constant "1" is right in exactly one of the two orders; one claim of two quoted right
    assert g["color/square"] == {"accuracy": 0.5, "careless": 1.0, "quoted": 0.5, "read": 0.0,
                                 "compared": None, "n": 2}
    assert g["color"]["accuracy"] == 0.75 and g["shape"]["careless"] == 1.0
    assert g["all"]["accuracy"] == pytest.approx(4 / 6)


class SaysEverythingMatches:
    """Reads the image right (or, with ``misread``, names another colour) and quotes both
    claims right, then says each claim matches the image: half the verdicts are wrong."""

    def __init__(self, misread=False):
        self.misread = misread

    def generate(self, pairs, *, do_sample, max_new_tokens, num_samples=1, **kw):
        texts = []
        for p in pairs:
            said = claims(p)
            fact = "a blue circle" if self.misread else image_fact(p)
            texts.append(f"<think>The image shows {fact}. "
                         + " ".join(f"Response {r} says {said[r]}{VERDICT[True]}." for r in (1, 2))
                         + "</think><answer>1</answer>")
        return SimpleNamespace(texts=texts)


def test_judge_groups_tells_reading_quoting_and_comparing_apart():
    pairs = [_pair(0, "circle", "color", 1), _pair(1, "square", "shape", 2)]
    g = sft_probe.judge_groups(SaysEverythingMatches(), pairs, batch_size=3)
    assert g["all"]["read"] == 1.0 and g["all"]["quoted"] == 1.0
    assert g["all"]["compared"] == 0.5  # 8 verdicts after a right reading, 4 right
    misread = sft_probe.judge_groups(SaysEverythingMatches(misread=True), pairs, batch_size=3)
    assert misread["all"]["read"] == 0.0 and misread["all"]["compared"] is None
    assert "| – |" in sft_probe.table([{"step": 1, "loss": 0.5, "groups": misread}])


def test_probe_writes_a_row_per_reading(tiny_dir, tmp_path, capsys):
    sft_probe.main(["--output", str(tmp_path), "--steps", "3", "--copy-warmup", "0", "--every", "2",
                    "--n-train", "8", "--n-heldout", "2", "--kinds", "color,shape"])
    rows = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # every 2 steps and the last
    for r in rows:
        assert r["groups"]["all"]["n"] == 4 and 0 <= r["groups"]["all"]["accuracy"] <= 1
        assert r["loss"] > 0
    assert "| step | loss | all |" in capsys.readouterr().out


def test_probe_reads_at_the_end_of_the_copy_warmup(tiny_dir, tmp_path):
    sft_probe.main(["--output", str(tmp_path), "--steps", "5", "--every", "4", "--n-train", "8",
                    "--n-heldout", "2", "--kinds", "color", "--copy-warmup", "0.4"])
    rows = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # the warm-up's last step (2 of 5) too
    assert all(0 <= r["groups"]["all"]["quoted"] <= 1 for r in rows)


def test_an_earlier_probe_is_not_overwritten_by_default(tmp_path, capsys):
    (tmp_path / "probe.jsonl").write_text("earlier\n")
    with pytest.raises(SystemExit):
        sft_probe.main(["--output", str(tmp_path), "--steps", "1"])
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "probe.jsonl").read_text() == "earlier\n"


@pytest.mark.parametrize("flag,value", [("--every", "0"), ("--kinds", "smell"),
                                        ("--guess-rate", "2"), ("--copy-warmup", "1"),
                                        ("--copy-warmup-on", "smell"), ("--blank-judge-on", "smell")])
def test_bad_flags_are_refused_by_name(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit):
        sft_probe.main(["--output", str(tmp_path), flag, value])
    assert flag in capsys.readouterr().err


def test_the_cold_start_flags_reach_the_config(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_probe(out, cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(sft_probe, "probe", fake_probe)
    with pytest.raises(Stop):
        sft_probe.main(["--output", str(tmp_path), "--copy-warmup-on", "shape",
                        "--blank-judge-on", "color,shape"])
    assert (seen["cfg"].copy_warmup_on, seen["cfg"].blank_judge_on) == ("shape", "color,shape")
