"""r1reward.compare: the per-run figures, the table, the plot and its errors on bad run dirs
(run directories written here in the trainer's format; test_train checks a real one)."""
import json

import pytest

from r1reward import compare


def write_run(d, seed, before, after, rows, at_chance=(), sft_seconds=400.0):
    d.mkdir(parents=True)
    groups_b = {"color": before - 0.05, "shape": before + 0.05, "color/circle": 0.9}
    groups_a = {"color": after - 0.05, "shape": after + 0.05, "color/circle": 1.0}
    summary = {"heldout_accuracy_before": before, "heldout_accuracy_after": after,
               "heldout_before": {"accuracy": before, "by_group": groups_b},
               "heldout_after": {"accuracy": after, "by_group": groups_a},
               "cold_start_at_chance": list(at_chance), "steps": len(rows), "wall_seconds": 120.0,
               "sft": {"seconds": sft_seconds, "cached": False}, "skipped_steps": 1}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.json").write_text(json.dumps({"seed": seed}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


ROWS = [
    {"step": 1, "preclip_frac": 0.0, "clip_frac": 0.01, "filtered_frac": 0.0, "ratio_max": 1.5},
    {"step": 2, "preclip_frac": 0.02, "clip_frac": 0.0, "filtered_frac": 0.1, "ratio_max": 3.0,
     "heldout_accuracy": 0.7, "heldout_accuracy/color": 0.6, "heldout_accuracy/shape": 0.8},
    {"step": 3, "preclip_frac": 0.0, "clip_frac": 0.03, "filtered_frac": 0.2, "ratio_max": 1.2},
]


def test_summary_counts_each_mechanism_and_the_gain(tmp_path):
    run = compare.load_run(write_run(tmp_path / "a", 2, 0.6, 0.75, ROWS, at_chance=["color"]))
    s = compare.summarize(run)
    assert (s["preclip_steps"], s["clip_steps"], s["filter_steps"]) == (1, 2, 2)
    assert s["gain_points"] == pytest.approx(15.0)
    assert s["ratio_max_mean"] == pytest.approx(1.9) and s["ratio_max_max"] == 3.0
    assert s["by_kind"] == {"color": (pytest.approx(0.55), pytest.approx(0.70)),
                            "shape": (pytest.approx(0.65), pytest.approx(0.80))}
    # before RL, the step-2 evaluation, after RL at the last step
    assert compare.heldout_curve(run) == [(0, 0.6), (2, 0.7), (3, 0.75)]
    assert compare.heldout_curve(run, "color") == [(0, pytest.approx(0.55)), (2, 0.6),
                                                   (3, pytest.approx(0.70))]
    text = compare.table([s])
    assert "0.600 → 0.750 | +15.0" in text and "(at chance after SFT)" in text
    assert "1 / 2 / 2 of 3" in text and "1.90 / 3.00" in text


def test_table_names_the_machines_under_it(tmp_path):
    machine = {"cpu": "Some CPU", "logical_cpus": 2, "torch_threads": 2,
               "aten_cpu_capability": "AVX2", "mkl_branch": "AUTO"}
    runs = []
    for name, isa in (("a", "AVX2"), ("b", "AVX512"), ("c", "AVX2")):
        d = write_run(tmp_path / name, 0, 0.6, 0.7, ROWS)
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "machine": {**machine, "aten_cpu_capability": isa}}))
        runs.append(compare.summarize(compare.load_run(d)))
    text = compare.table(runs)
    assert "machine: Some CPU (2 CPUs, 2 threads; ATen AVX2, MKL AUTO) (a, c)" in text
    assert "machine: Some CPU (2 CPUs, 2 threads; ATen AVX512, MKL AUTO) (b)" in text
    # one machine: one line, no run names; runs from before the field: no line
    assert compare.table(runs[:1]).endswith("machine: Some CPU (2 CPUs, 2 threads; ATen AVX2, MKL AUTO)")
    old = compare.summarize(compare.load_run(write_run(tmp_path / "old", 0, 0.6, 0.7, ROWS)))
    assert "machine:" not in compare.table([old])


def test_cli_writes_table_plot_and_json(tmp_path, capsys):
    a = write_run(tmp_path / "a", 0, 0.6, 0.75, ROWS)
    b = write_run(tmp_path / "b", 1, 0.7, 0.72, ROWS[:2])
    compare.main([str(a), str(b), "--plot", str(tmp_path / "fig.png"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert out.count("\n| a |") + out.count("\n| b |") == 2
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert [r["seed"] for r in json.loads((tmp_path / "r.json").read_text())] == [0, 1]


def test_bad_run_dirs_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "nowhere/summary.json: missing" in capsys.readouterr().err
    d = write_run(tmp_path / "bad", 0, 0.5, 0.6, ROWS)
    (d / "metrics.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(compare.RunError, match=r"metrics.jsonl:2: not valid JSON"):
        compare.load_run(d)
