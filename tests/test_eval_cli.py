"""The eval harness end to end with the scripted judge of test_judge.py (output files,
skips by id, resuming), and once on the embedded tiny model through the real CLI."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from test_benchmarks import FIXTURE
from test_judge import ScriptedJudge

from r1reward import eval as E

N = 30


@pytest.fixture
def bench(tmp_path):
    """The first N real VL-RewardBench records with placeholder images; one image missing."""
    if not FIXTURE.is_file():
        pytest.skip("VL-RewardBench fixture not available")
    lines = FIXTURE.read_text().splitlines()[:N]
    data = tmp_path / "vl.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recs = [json.loads(l) for l in lines]
    for r in recs[1:]:
        p = tmp_path / "img" / r["image"]
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p, format="PNG")
    return data, tmp_path / "img", recs


def _args(data, images, out, *extra):
    return ["--bench", "vl_reward_bench", "--data", str(data), "--images", str(images),
            "--output", str(out), "--no-progress", *extra]


def test_outputs_skips_and_table(bench, tmp_path, capsys):
    data, images, recs = bench
    out = tmp_path / "out"
    s = E.main(_args(data, images, out, "--k", "3", "--swap"), judge=ScriptedJudge())
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (N - 1)
    assert {"id", "category", "order", "votes", "correct"} <= set(rows[0])
    assert {r["order"] for r in rows} == {"chosen_first", "chosen_second"}
    assert all(len(r["votes"]) == 3 for r in rows)
    # the scripted model sees equal quality, answers "1" and leans 0.1 towards it
    assert s["accuracy_by_order"] == {"chosen_first": 1.0, "chosen_second": 0.0}
    assert s["flip_rate"] == 1.0 and s["answer1_rate"] == 1.0 and s["overall_accuracy"] == 0.5
    assert s["n_skipped"] == 1 and s["skipped"][0]["id"] == recs[0]["id"]
    assert "image not found" in s["skipped"][0]["reason"]
    saved = json.loads((out / "summary.json").read_text())
    for key in ("overall_accuracy", "macro_accuracy", "per_category", "flip_rate", "answer1_rate"):
        assert key in saved and key in saved["by_k"]["3"]
    assert set(saved["by_k"]) == {"1", "3"}
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "overall accuracy" in text and "hallucination" in text and "K=3" in text


def test_rerun_resumes_and_never_mixes_runs(bench, tmp_path):
    data, images, _ = bench
    out = tmp_path / "out"
    first = E.main(_args(data, images, out, "--swap"), judge=ScriptedJudge())
    # cut the file as an interrupted run would: 10 whole rows and half a line
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])
    again = ScriptedJudge()
    second = E.main(_args(data, images, out, "--swap"), judge=again)
    assert sum(again.batches) == 2 * (N - 1) - 10  # only the missing rows were judged
    assert second["overall_accuracy"] == first["overall_accuracy"]
    done = ScriptedJudge()
    E.main(_args(data, images, out, "--swap"), judge=done)
    assert done.calls["generate"] == 0
    with pytest.raises(SystemExit, match="different run"):
        E.main(_args(data, images, out, "--model", "/elsewhere"), judge=ScriptedJudge())


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--data is required"):
        E.main(["--bench", "vl_reward_bench", "--output", str(tmp_path)], judge=ScriptedJudge())
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        E.main(["--bench", "vl_reward_bench", "--data", str(tmp_path / "nope.jsonl"),
                "--output", str(tmp_path)], judge=ScriptedJudge())


def test_cli_on_embedded_tiny_model(tiny_dir, tmp_path):
    """The real path: tiny checkpoint, generated held-out pairs, both orders, K = 3."""
    out = tmp_path / "tiny"
    env = dict(os.environ, R1REWARD_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "r1reward.eval", "--bench", "pairs",
                           "--model", str(tiny_dir),
                           "--n-heldout", "4", "--limit", "2", "--swap", "--k", "3", "--max-new-tokens", "8",
                           "--no-progress", "--output", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and s["n_items"] == 2 and s["n_skipped"] == 0
    assert all(len(r["votes"]) == 3 and all(0.0 <= p <= 1.0 for p in r["p1"]) for r in rows)
    assert set(s["by_k"]) == {"1", "3"} and 0.0 <= s["overall_accuracy"] <= 1.0
    from r1reward.data import DATA_VERSION
    key = f"gen-v{DATA_VERSION}-s0-n0-h4-color_shape"  # r1reward.data.generated_split's key
    assert (tmp_path / "cache" / "data" / key / "heldout.jsonl").is_file()
    assert "overall accuracy" in proc.stdout


def test_pairs_bench_reads_generated_heldout(tmp_path):
    from r1reward.data import generate_dataset
    _, heldout = generate_dataset(tmp_path / "gen", 0, 6, seed=3)
    s = E.main(["--bench", "pairs", "--data", str(heldout), "--swap", "--no-progress",
                "--output", str(tmp_path / "out")], judge=ScriptedJudge())
    assert s["n_items"] == 6 and s["n_skipped"] == 0
    assert set(s["per_category"]) == {"color", "shape", "count"}
    # chosen is the preferred response whichever slot it had in the file
    rows = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["correct"] == (r["order"] == "chosen_first") for r in rows)


def test_real_checkpoints_default_to_the_release_generation_length(tiny_dir, tmp_path):
    from transformers import Qwen2_5_VLConfig

    from r1reward.eval import default_max_new_tokens
    assert default_max_new_tokens(None) == 256 and default_max_new_tokens(tiny_dir) == 256
    Qwen2_5_VLConfig(text_config=dict(hidden_size=3584, num_attention_heads=28,
                                      num_key_value_heads=4)).save_pretrained(tmp_path / "big")
    assert default_max_new_tokens(tmp_path / "big") == 4096
