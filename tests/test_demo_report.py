"""The demo's table over seeds (mean ± sample std, checked against hand-computed values), its loss
log reader, its picture, and how --seeds lays out folders."""

from __future__ import annotations

import json

import pytest

from llava.demo.report import draw_study, loss_history, mean_std, summary_table

BENCH = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench")


def row(method: str, values: list[float], params: float | None = None) -> dict:
    return {"method": method, "params_percent": params,
            "benchmarks": {key: {"score": v, "source": "local", "upload": None} for key, v in zip(BENCH, values)}}


def cells(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_mean_and_sample_std():
    # 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n-1 = 3) -> sqrt(5/3)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5) and std == pytest.approx(1.2909944, abs=1e-6)
    assert mean_std([7.0]) == (7.0, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_summary_table_over_three_seeds_by_hand():
    runs = {
        0: [row("Base (untrained)", [30, 40, 10, 30, 20, 50, 0]), row("FT", [80, 70, 90, 60, 80, 90, 40], 95.5)],
        1: [row("Base (untrained)", [32, 44, 10, 36, 20, 56, 3]), row("FT", [90, 70, 80, 66, 80, 96, 50], 95.5)],
        2: [row("Base (untrained)", [34, 42, 10, 33, 26, 53, 0]), row("FT", [85, 76, 85, 72, 86, 93, 60], 95.5)],
    }
    table = summary_table(runs)
    assert table.splitlines()[0].startswith("| Method | # Params (%) | VQAv2 | GQA | VisWiz | SQA | VQAT | POPE | MMBench | Avg |")
    ft = cells(table, "FT")
    assert ft[1] == "95.5"
    # VQAv2 80, 90, 85: mean 85, deviations -5, 5, 0 -> sqrt(50 / 2) = 5.0
    assert ft[2] == "85.0 ± 5.0"
    # GQA 70, 70, 76: mean 72, deviations -2, -2, 4 -> sqrt(24 / 2) = 3.46
    assert ft[3] == "72.0 ± 3.5"
    # MMBench 40, 50, 60: mean 50, std 10
    assert ft[8] == "50.0 ± 10.0"
    # Avg over each seed's average: 510/7 = 72.857, 532/7 = 76.0, 557/7 = 79.571;
    # mean 76.143, deviations -3.286, -0.143, 3.429 -> sqrt((10.796 + 0.020 + 11.755) / 2) = 3.36
    assert ft[9] == "76.1 ± 3.4"
    base = cells(table, "Base (untrained)")
    assert base[1] == "-" and base[2] == "32.0 ± 2.0" and base[4] == "10.0 ± 0.0"
    # MMBench 0, 3, 0: mean 1, deviations -1, 2, -1 -> sqrt(6 / 2) = 1.73
    assert base[8] == "1.0 ± 1.7"
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["Base (untrained)", "FT"]
    assert "sample standard deviation (n-1) over 3 seeds (0, 1, 2)" in table


def test_the_table_over_seeds_names_the_runs_that_gave_one_pope_answer():
    rows = {seed: [row("Base (untrained)", [30] * 7), row("FT", [80] * 7, 95.5)] for seed in (0, 1)}
    rows[0][0]["benchmarks"]["pope"]["yes_ratio"] = 0.0
    rows[1][1]["benchmarks"]["pope"]["yes_ratio"] = 1.0
    rows[0][1]["benchmarks"]["pope"]["yes_ratio"] = 0.5
    notes = [line for line in summary_table(rows).splitlines() if "POPE questions" in line]
    assert [note.split(":")[0] for note in notes] == ['Base (untrained) (seed 0) answered "no" to 100% of the POPE questions',
                                                      'FT (seed 1) answered "yes" to 100% of the POPE questions']


def test_a_missing_score_is_not_averaged_away():
    runs = {0: [row("FT", [80] * 7)], 1: [row("FT", [90] * 6 + [None])]}
    ft = cells(summary_table(runs), "FT")
    assert ft[2] == "85.0 ± 7.1" and ft[8] == "-" and ft[9] == "-"


def test_loss_history_reads_the_trainer_log(tmp_path):
    state = {"log_history": [{"loss": 2.5, "step": 10, "epoch": 0.1}, {"loss": 1.25, "step": 20, "epoch": 0.2},
                             {"train_loss": 1.8, "train_runtime": 3.0, "step": 20}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert loss_history(tmp_path) == [(10, 2.5), (20, 1.25)]
    assert loss_history(tmp_path / "absent") == []


def test_the_picture_is_a_png(tmp_path):
    history = {"FT": [(10, 2.0), (20, 1.0)], "LoRA": [(10, 2.2), (20, 1.1)], "DoRA": [(10, 2.1), (20, 1.0)]}
    rows = [row("Base (untrained)", [30] * 7), row("FT", [80] * 7), row("LoRA", [75] * 7), row("DoRA", [78] * 7)]
    runs = {0: {"rows": rows, "losses": history}, 1: {"rows": rows, "losses": history}}
    for name, picked in (("one.png", {0: runs[0]}), ("two.png", runs)):
        png = draw_study(tmp_path / name, picked, "test")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_seeds_get_their_own_folders_and_a_summary_folder(tmp_path):
    from llava.demo.run import DemoConfig, parse_args, summary_folder

    cfgs, args = parse_args(["--seeds", "0", "1", "2"])
    assert [c.seed for c in cfgs] == [0, 1, 2]
    assert [c.out_dir.name for c in cfgs] == ["demo", "demo-seed1", "demo-seed2"]
    assert [c.data_dir for c in cfgs] == [DemoConfig.data_dir, DemoConfig.data_dir.parent / "demo-seed1",
                                          DemoConfig.data_dir.parent / "demo-seed2"]
    assert summary_folder(DemoConfig.out_dir, args.seeds) == DemoConfig.out_dir.parent / "demo-seeds0-1-2"
    cfgs, _ = parse_args(["--seeds", "0", "3", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "d"), "--quick"])
    assert [c.out_dir for c in cfgs] == [tmp_path / "o", tmp_path / "o-seed3"]
    assert [c.data_dir for c in cfgs] == [tmp_path / "d", tmp_path / "d-seed3"]
    assert all(c.lm_steps < DemoConfig.lm_steps for c in cfgs)
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "1", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--seed", "1", "--seeds", "2"])


def test_a_dora_row_says_its_magnitude_mode_over_seeds():
    dora = [dict(row("DoRA", [70] * 7, 14.77), dora_magnitudes="trained") for _ in range(2)]
    table = summary_table({0: [row("LoRA", [60] * 7, 14.43), dora[0]], 1: [row("LoRA", [62] * 7, 14.43), dora[1]]})
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["LoRA", "DoRA (trained m)"]
    assert cells(table, "DoRA (trained m)")[2] == "70.0 ± 0.0"
