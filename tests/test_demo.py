"""The README's first command, shortened: every stage runs and leaves its files, and the table has all columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["Method", "# Params (%)", "VQAv2", "GQA", "VisWiz", "SQA", "VQAT", "POPE", "MMBench", "Avg"]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_prints_the_table(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    cmd = [sys.executable, "-m", "llava.demo.run", "--quick", "--data-dir", str(data), "--out-dir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert (data / "train" / "llava_demo_mix.json").exists() and (data / "eval" / "pope" / "llava_pope_test.jsonl").exists()
    assert (out / "base" / "vicuna-tiny" / "model.safetensors").exists()
    assert (out / "base" / "clip-tiny" / "preprocessor_config.json").exists()
    assert (out / "base" / "clip-tiny" / ".done").exists()  # the contrastive stage ran on the tower
    assert (out / "projector" / "mm_projector.bin").exists()
    assert (out / "ft" / "model.safetensors").exists()
    for method in ("lora", "dora"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors", "config.json"):
            assert (out / method / name).exists(), out / method / name
    results = out / "results"
    for row in ("Base (untrained)", "FT", "LoRA", "DoRA"):
        assert (results / row / "results.json").exists(), row
        # 7B_eval_dora.sh's outputs, all under RESULTPATH: answers, uploads in the official formats, scores.
        for path in (
            f"vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015/{row}.json",
            f"gqa/{row}/testdev_balanced_predictions.json",
            f"vizwiz/answers_upload/{row}.json",
            f"scienceqa/{row}_result.json",
            f"textvqa/answers/{row}/merge.jsonl",
            f"pope/answers/{row}/merge.jsonl",
            f"mmbench/answers_upload/mmbench_dev_20230712/{row}.xlsx",
        ):
            assert (results / path).exists(), results / path
    assert not any(p.name.endswith(".jsonl") and "answers" in p.parts for p in (data / "eval").rglob("*")), \
        "the evaluation wrote into EVALPATH"

    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = {line.strip("|").split("|")[0].strip(): line for line in lines[2:]}
    assert list(rows) == ["Base (untrained)", "FT", "LoRA", "DoRA (trained m)"]  # the magnitude mode is labelled
    for name, line in rows.items():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS)
        assert all(cell != "-" for cell in cells[2:]), f"{name}: a benchmark has no score: {line}"
    params = {name: float(line.strip("|").split("|")[1]) for name, line in rows.items() if name != "Base (untrained)"}
    # Counted as the paper counts (frozen vision tower in the total): full finetuning stays under 100%.
    assert 50 < params["FT"] < 100 and 0 < params["LoRA"] < params["DoRA (trained m)"] < params["FT"], params

    # Beside the table: the same table in a file and the study as a picture; each stage reports progress.
    assert (out / "table.md").read_text().startswith("| Method |")
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("language model step", "vision tower step", "[projector] step", "[finetune FT] step",
                  "[finetune DoRA] step", "[evaluate LoRA] POPE: 18 questions answered"):
        assert stage in result.stderr, stage
    # Its last lines say how to talk to what it trained, in the browser and in the terminal.
    chat = result.stdout[result.stdout.index("Talk to what the demo trained"):]
    assert f"-m llava.serve.web --model-path {out / 'ft'} {out / 'lora'} {out / 'dora'}" in chat
    assert f"-m llava.serve.cli --model-path {out / 'dora'} --model-base {out / 'base' / 'vicuna-tiny'}" in chat
    state = json.loads((out / "lora" / "trainer_state.json").read_text())
    assert any("loss" in entry for entry in state["log_history"])

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "done already" in rerun.stderr and "[finetune DoRA] ..." not in rerun.stderr


def test_another_seed_gets_its_own_folders_unless_they_are_given(tmp_path):
    from llava.demo.run import DemoConfig, parse_args

    [cfg], _ = parse_args([])
    assert (cfg.seed, cfg.data_dir, cfg.out_dir) == (0, DemoConfig.data_dir, DemoConfig.out_dir)
    [cfg], _ = parse_args(["--seed", "3"])
    assert cfg.seed == 3
    assert cfg.data_dir == DemoConfig.data_dir.parent / "demo-seed3"
    assert cfg.out_dir == DemoConfig.out_dir.parent / "demo-seed3"
    [cfg], _ = parse_args(["--seed", "3", "--out-dir", str(tmp_path), "--quick"])
    assert cfg.out_dir == tmp_path and cfg.data_dir == DemoConfig.data_dir.parent / "demo-seed3"
    assert cfg.lm_steps < DemoConfig.lm_steps  # --quick shortens the run


def test_a_stage_is_reused_only_when_made_with_the_same_settings(tmp_path):
    from dataclasses import replace

    from llava.demo.run import DemoConfig, settings, stage

    calls = []
    cfg = DemoConfig(data_dir=tmp_path / "d", out_dir=tmp_path / "o")
    marker = tmp_path / "o" / "stage" / ".done"

    def run(config):
        stage("x", marker, settings(config))(calls.append)(config.seed)

    run(cfg)
    run(cfg)
    assert calls == [0]  # done once, then reused
    run(replace(cfg, out_dir=tmp_path / "elsewhere", log_every=7))
    assert calls == [0]  # where outputs go and how a stage logs do not change what it makes
    run(replace(cfg, n_train=cfg.n_train + 1))
    assert calls == [0, 0]  # another setting: the stage runs again
    marker.write_text("ok\n")  # a marker from before markers held settings
    run(cfg)
    assert calls == [0, 0, 0] and marker.read_text() == settings(cfg)


def test_jobs_run_side_by_side_after_what_they_wait_for():
    import threading
    import time

    from llava.demo.run import run_jobs

    lock, log, active, most = threading.Lock(), [], [0], [0]

    def job(name: str, seconds: float):
        def go():
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
                log.append(("start", name))
            time.sleep(seconds)
            with lock:
                active[0] -= 1
                log.append(("end", name))
        return go

    tasks = {"slow": (job("slow", 0.3), ()), "quick": (job("quick", 0.05), ()), "base": (job("base", 0.05), ()),
             "after slow": (job("after slow", 0.01), ("slow",)), "after quick": (job("after quick", 0.01), ("quick",))}
    run_jobs(2, tasks)
    assert most[0] == 2 and len(log) == 10
    assert log[:2] == [("start", "slow"), ("start", "quick")]  # the order given, two at a time
    for name, waits in (("after slow", "slow"), ("after quick", "quick")):
        assert log.index(("end", waits)) < log.index(("start", name))
    # "quick" ends first: "base" takes its place, then "after quick" (ready) before "after slow" (not yet).
    assert log.index(("start", "base")) < log.index(("start", "after quick")) < log.index(("start", "after slow"))

    log.clear()
    run_jobs(1, tasks)
    assert [event for event, _ in log] == ["start", "end"] * 5  # one at a time


def test_a_failed_job_stops_the_ones_waiting_and_is_raised():
    from llava.demo.run import run_jobs

    ran = []

    def fail():
        raise RuntimeError("finetune failed")

    tasks = {"a": (fail, ()), "b": (lambda: ran.append("b"), ()), "after a": (lambda: ran.append("after a"), ("a",))}
    with pytest.raises(RuntimeError, match="finetune failed"):
        run_jobs(2, tasks)
    assert "after a" not in ran
    with pytest.raises(ValueError, match="unknown"):
        run_jobs(2, {"x": (lambda: None, ("y",))})


def test_every_finetune_and_evaluation_runs_on_one_thread_whatever_the_jobs_and_cores(monkeypatch):
    """A run's numbers depend on its thread count: fixed at one, --jobs and the machine's cores change only
    how many run at a time, not the table."""
    from dataclasses import replace

    from llava.demo import run
    from llava.demo.run import job_threads, parse_args

    [cfg], _ = parse_args(["--jobs", "1"])
    for cores, jobs in ((2, 1), (2, 2), (8, 2), (1, 2), (6, 4)):
        monkeypatch.setattr(run.os, "cpu_count", lambda: cores)
        assert job_threads(replace(cfg, jobs=jobs)) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with pytest.raises(SystemExit):
        parse_args(["--jobs", "0"])


@pytest.mark.parametrize("seed", ["-1", "4294967296", "abc"])
def test_a_seed_numpy_and_torch_refuse_is_refused_at_once(seed, capsys):
    from llava.demo.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--seed", seed])
    assert "scripts/demo.sh: error: argument --seed" in capsys.readouterr().err
    assert parse_args(["--seeds", "0", str(2**32 - 1)])[0][1].seed == 2**32 - 1
