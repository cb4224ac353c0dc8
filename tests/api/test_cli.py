"""The tallytrain command: info, run, compare, run directories, resume after
a kill, and clear errors that leave existing files alone."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tallytrain.app.experiment import option_fields
from tallytrain.cli import main
from tallytrain.fl.registry import method_names
from tallytrain.report import read_jsonl, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--peers",
    "4",
    "--rounds",
    "2",
    "--local-steps",
    "3",
    "--distill-steps",
    "2",
    "--batch-size",
    "16",
    "--distill-batch-size",
    "16",
    "--hidden",
    "16",
    "--probes-per-round",
    "40",
    "--server-distill-steps",
    "2",
    "--alpha",
    "0.5",
    "--min-shard-size",
    "5",
    "--quiet",
]
SUMMARY_KEYS = {
    "final_accuracy_mean",
    "final_accuracy_std",
    "total_bytes",
    "uplink_bytes",
    "downlink_bytes",
    "seeds",
    "phase_seconds",
}


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "CPU ops served by" in text and "tally" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] in ("native", "reference") and "ops" in info


def test_compare_writes_a_complete_run_directory(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    rc = main(
        ["compare", "--methods", "local,fedavg,softlabel,tallytrain", "--seeds", "2", "--out", out]
        + TINY
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| tallytrain |" in printed and "total / softlabel" in printed
    for name in (
        "config.json",
        "partition.json",
        "metrics.jsonl",
        "comm.csv",
        "summary.json",
        "accuracy_vs_round.png",
        "accuracy_vs_bytes.png",
        "partition_heatmap.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary) == {"methods"}
    assert list(summary["methods"]) == ["local", "fedavg", "softlabel", "tallytrain"]
    for m in summary["methods"].values():
        assert set(m) == SUMMARY_KEYS and m["seeds"] == 2
        assert m["total_bytes"] == m["uplink_bytes"] + m["downlink_bytes"]
        assert {"local_training", "distillation", "ops", "messaging"} <= set(m["phase_seconds"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 4 * 2 * 2
    assert {(r["method"], r["seed"], r["round"]) for r in rows} == {
        (m, s, r) for m in summary["methods"] for s in (0, 1) for r in (0, 1)
    }
    # comm.csv sums to the summary's bytes, method by method
    with open(os.path.join(out, "comm.csv")) as f:
        comm = list(csv.DictReader(f))
    for name, m in summary["methods"].items():
        total = sum(int(r["bytes"]) for r in comm if r["method"] == name)
        assert total == m["total_bytes"] * 2  # summary: mean over 2 seeds
    part = json.load(open(os.path.join(out, "partition.json")))
    assert set(part["seeds"]) == {"0", "1"} and len(part["seeds"]["0"]["shards"]) == 4


def test_same_seed_same_numbers_through_the_cli(tmp_path):
    for name in ("a", "b"):
        assert main(["run", "--method", "tallytrain", "--out", str(tmp_path / name)] + TINY) == 0
    a = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    b = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert without_timing(a) == without_timing(b)
    with open(tmp_path / "a" / "comm.csv") as fa, open(tmp_path / "b" / "comm.csv") as fb:
        assert fa.read() == fb.read()


def test_parallel_jobs_give_the_same_results(tmp_path):
    args = ["compare", "--methods", "fedavg,tallytrain,bridge", "--seeds", "2"] + TINY
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    two = read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
    assert len(one) == 3 * 2 * 2 and without_timing(one) == without_timing(two)
    with open(tmp_path / "one" / "comm.csv") as fa, open(tmp_path / "two" / "comm.csv") as fb:
        assert fa.read() == fb.read()


def test_pareto_writes_points_frontier_and_dominance(tmp_path, capsys):
    out = tmp_path / "pareto"
    rc = main(
        [
            "pareto",
            "--periods",
            "1,2",
            "--baselines",
            "fedavg,fedprox",
            "--bridge-fractions",
            "0.01,1",
            "--bridge-periods",
            "1",
            "--seeds",
            "2",
            "--out",
            str(out),
        ]
        + TINY
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dominated by a bridge point" in printed and "baseline points" in printed
    result = json.load(open(out / "pareto.json"))
    labels = [p["label"] for p in result["points"]]
    assert labels == [
        "fedavg-R1",
        "fedavg-R2",
        "fedprox-R1",
        "fedprox-R2",
        "softlabel",
        "tallytrain",
        "bridge-k1pct-R1",
        "bridge-k100pct-R1",
    ]
    summary = json.load(open(out / "summary.json"))["methods"]
    for p in result["points"]:
        assert {
            "method",
            "setting",
            "final_accuracy_mean",
            "final_accuracy_std",
            "total_bytes",
        } <= set(p)
        assert p["total_bytes"] == summary[p["label"]]["total_bytes"]
        assert p["final_accuracy_mean"] == summary[p["label"]]["final_accuracy_mean"]
        assert ("dominated_by_bridge" in p) == (p["method"] != "bridge")
    by = {p["label"]: p for p in result["points"]}
    assert by["fedavg-R2"]["setting"] == "every 2 rounds"
    assert by["bridge-k1pct-R1"]["setting"] == "top 1%, every round"
    # merging every 2 rounds sends half of every round's bytes
    assert 2 * by["fedavg-R2"]["total_bytes"] == by["fedavg-R1"]["total_bytes"]
    assert os.path.getsize(out / "pareto.png") > 0 and os.path.getsize(out / "pareto.md") > 0
    for p in result["points"]:
        assert len(p["seed_accuracy"]) == 2


def test_pareto_analysis_by_hand():
    from tallytrain.fl.config import CompareConfig, RunConfig
    from tallytrain.app.pareto import analyze, pareto_config

    cfg = pareto_config(
        RunConfig(),
        [0, 1],
        periods=[1],
        baselines=["fedavg"],
        bridge_fractions=[0.01],
        bridge_periods=[1, 5],
    )
    assert cfg.methods == (
        "fedavg-R1",
        "softlabel",
        "tallytrain",
        "bridge-k1pct-R1",
        "bridge-k1pct-R5",
    )
    seeds = {
        "fedavg-R1": [0.80, 0.90],
        "softlabel": [0.95, 0.95],
        "tallytrain": [0.70, 0.70],
        "bridge-k1pct-R1": [0.88, 0.84],
        "bridge-k1pct-R5": [0.60, 0.60],
    }
    nbytes = {
        "fedavg-R1": 1000,
        "softlabel": 500,
        "tallytrain": 10,
        "bridge-k1pct-R1": 100,
        "bridge-k1pct-R5": 50,
    }
    summary = {
        "methods": {
            k: {
                "final_accuracy_mean": sum(v) / 2,
                "final_accuracy_std": 0.0,
                "total_bytes": nbytes[k],
                "seeds": 2,
            }
            for k, v in seeds.items()
        }
    }
    result = analyze(cfg, summary, seeds)
    by = {p["label"]: p for p in result["points"]}
    # bridge-k1pct-R1 (0.86 at 100 B) dominates fedavg-R1 (0.85 at 1000 B) on the
    # mean, but not on seed 1 (0.84 < 0.90); nothing dominates softlabel.
    assert by["fedavg-R1"]["dominated_by_bridge"] == ["bridge-k1pct-R1"]
    assert by["fedavg-R1"]["dominated_on_every_seed_by"] == []
    assert by["softlabel"]["dominated_by_bridge"] == []
    assert by["tallytrain"]["dominated_by_bridge"] == []
    assert [p["label"] for p in result["points"] if p["on_frontier"]] == [
        "softlabel",
        "tallytrain",
        "bridge-k1pct-R1",
    ]
    assert result["baselines_dominated"] == 1 and result["baselines_dominated_on_every_seed"] == 0
    one = analyze(
        CompareConfig(methods=cfg.methods, seeds=(0,), base=cfg.base, settings=cfg.settings),
        summary,
        {k: v[:1] for k, v in seeds.items()},
    )
    assert one["baselines_dominated_on_every_seed"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--periods", "1,1"], "--periods lists a value twice"),
        (["--bridge-fractions", "0"], "--bridge-fractions must list fractions in"),
        (["--baselines", "fedavg,local"], "--baselines may only name"),
        (["--merge-period", "3"], "pareto sets --merge-period per operating point"),
    ],
)
def test_pareto_bad_options(tmp_path, capsys, args, message):
    assert main(["pareto", "--out", str(tmp_path / "p")] + TINY + args) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


def test_parallel_worker_error_is_reported_and_resume_still_works(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--methods",
        "fedavg,tallytrain",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--jobs",
        "2",
    ] + TINY
    assert main(args) == 0
    before = read_jsonl(str(out / "metrics.jsonl"))
    broken = out / "runs" / "tallytrain" / "seed1" / "result.json"
    broken.write_text("{not json")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "result.json" in err and "corrupt" in err
    os.remove(broken)  # the run's checkpoint is intact: resume rewrites its result
    assert main(args + ["--resume"]) == 0
    assert without_timing(read_jsonl(str(out / "metrics.jsonl"))) == without_timing(before)


def test_dominance_by_hand():
    from tallytrain.app.pareto import dominates

    a = {"final_accuracy_mean": 0.9, "total_bytes": 100}
    b = {"final_accuracy_mean": 0.8, "total_bytes": 100}
    c = {"final_accuracy_mean": 0.95, "total_bytes": 1000}
    assert dominates(a, b) and not dominates(b, a)
    assert not dominates(a, c) and not dominates(c, a)
    assert not dominates(a, dict(a))  # equal points do not dominate each other


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--methods", "tallytrain,fedsgd"],
            "unknown method 'fedsgd'; known methods: " + ", ".join(method_names()),
        ),
        (
            ["--dataset", "imagenet"],
            "unknown dataset 'imagenet'; known datasets: digits, synthetic, mnist",
        ),
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--alpha", "-1"], "--alpha must be > 0"),
        (["--peers", "2000"], "--peers (2000) exceeds the 1079 training samples"),
        (["--probes-per-round", "5000"], "--probes-per-round (5000) exceeds the probe pool of 359"),
        (["--methods", "fedavg", "--archs", "mlp,cnn"], "averages parameters"),
        (["--dataset", "mnist"], "pass --data-dir"),
        (["--methods", ""], "--methods names no method (got '')"),
        (["--methods", ","], "--methods names no method (got ',')"),
        (["--alpha", "inf"], "argument --alpha: expected a finite number, got 'inf'"),
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["--peers", "four"], "argument --peers: expected an integer, got 'four'"),
        (["--abstain-below", "2"], "--abstain-below must be in [0, 1], got 2.0"),
        (["--merge-period", "0", "--methods", "fedavg"], "'fedavg' needs --merge-period >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--plugin", "no_such_plugin_module"], "--plugin no_such_plugin_module: cannot import it"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["compare", "--out", str(out)] + TINY + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("tallytrain: error:") and err.count("\n") == 1
    # options are named as options, never as config fields
    assert not [name for name in option_fields() if "_" in name and name in err]
    assert "Warning" not in err
    assert not out.exists()


@pytest.mark.parametrize("content", [os.urandom(3000), b"gzip"[:0]])
def test_unreadable_dataset_files_are_one_line(tmp_path, capsys, content):
    """A .gz of random bytes (BadGzipFile) or a truncated one (EOFError)."""
    import gzip

    if not content:  # the first half of a real gzip stream
        whole = gzip.compress(bytes(4) + os.urandom(6000))
        content = whole[: len(whole) // 2]
    data = tmp_path / "mnist"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(content)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    before = snapshot(data)
    out = tmp_path / "run"
    assert (
        main(["compare", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out)] + TINY)
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("tallytrain: error: ") and err.count("\n") == 1
    assert "train-images-idx3-ubyte.gz: cannot read it (" in err
    assert ("BadGzipFile" if len(content) == 3000 else "EOFError") in err
    assert not out.exists() and snapshot(data) == before


def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a").write_text("my notes")
    assert main(["run", "--method", "local", "--out", str(tmp_path / "a" / "b")] + TINY) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tallytrain: error: cannot create --out {tmp_path / 'a' / 'b'}: {tmp_path / 'a'} is a "
        "file\n"
    )
    assert (tmp_path / "a").read_text() == "my notes"


def test_existing_directories_are_never_clobbered(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", "--method", "local", "--out", out] + TINY) == 0
    before = snapshot(out)
    assert main(["run", "--method", "local", "--out", out] + TINY) == 2
    assert "already exists" in capsys.readouterr().err
    # resume with other options: refused, naming the difference
    assert (
        main(
            ["run", "--method", "local", "--out", out, "--resume"]
            + TINY[:-1]
            + ["--quiet", "--alpha", "0.7"]
        )
        == 2
    )
    assert "--alpha: 0.5 != 0.7" in capsys.readouterr().err
    assert snapshot(out) == before
    # a folder that is not a run directory is not deleted by --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["run", "--method", "local", "--out", str(other), "--overwrite"] + TINY) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    # --overwrite replaces a run directory
    assert main(["run", "--method", "tallytrain", "--out", out, "--overwrite"] + TINY) == 0
    assert json.load(open(os.path.join(out, "config.json")))["methods"] == ["tallytrain"]


def test_resume_refuses_corrupt_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "tallytrain", "--out", str(out)] + TINY) == 0
    result = out / "runs" / "tallytrain" / "seed0" / "result.json"
    result.unlink()  # make the run look unfinished, then break its checkpoint
    ckpt = out / "runs" / "tallytrain" / "seed0" / "checkpoint.pt"
    ckpt.write_bytes(b"not a checkpoint")
    before = snapshot(out)
    assert main(["run", "--method", "tallytrain", "--out", str(out), "--resume"] + TINY) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt" in err and "delete" in err
    assert snapshot(out) == before
    (out / "config.json").write_text("{ truncated")
    assert main(["run", "--method", "tallytrain", "--out", str(out), "--resume"] + TINY) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
    assert (
        main(["run", "--method", "tallytrain", "--out", str(tmp_path / "none"), "--resume"] + TINY)
        == 2
    )
    assert "holds no config.json" in capsys.readouterr().err


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    slow = [
        "--peers",
        "4",
        "--rounds",
        "30",
        "--local-steps",
        "40",
        "--hidden",
        "16",
        "--probes-per-round",
        "40",
        "--alpha",
        "0.5",
        "--min-shard-size",
        "5",
        "--quiet",
    ]
    cmd = [sys.executable, "-m", "tallytrain.cli", "run", "--method", "tallytrain"] + slow
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = str(tmp_path / "killed")
    metrics = os.path.join(killed, "runs", "tallytrain", "seed0", "metrics.jsonl")
    proc = subprocess.Popen(
        cmd + ["--out", killed],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done_rounds = len(read_jsonl(metrics))
    assert 3 <= done_rounds < 30, "the run must have been killed mid-way"
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    resumed = subprocess.run(
        cmd + ["--out", killed, "--resume"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = str(tmp_path / "whole")
    assert main(["run", "--method", "tallytrain", "--out", whole] + slow) == 0
    a = read_jsonl(os.path.join(killed, "metrics.jsonl"))
    b = read_jsonl(os.path.join(whole, "metrics.jsonl"))
    assert len(a) == 30 and without_timing(a) == without_timing(b)
    with open(os.path.join(killed, "comm.csv")) as fa, open(os.path.join(whole, "comm.csv")) as fb:
        assert fa.read() == fb.read()
    assert not [f for f in os.listdir(os.path.dirname(metrics)) if ".tmp." in f]


def test_every_config_field_is_an_option():
    from tallytrain.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "compare",
            "--out",
            "x",
            "--methods",
            "tallytrain",
            "--abstain-below",
            "0.9",
            "--support-radius",
            "none",
            "--archs",
            "mlp,cnn",
            "--decentralized",
            "--sharpen-temperature",
            "0.1",
            "--alpha",
            "0.3",
            "--seeds",
            "3",
            "--seed",
            "5",
            "--order",
            "distill-train",
        ]
    )
    cfg = config_from_args(args, ["tallytrain"])
    assert cfg.seeds == (5, 6, 7)
    assert cfg.base.protocol.abstain_below == 0.9 and cfg.base.protocol.decentralized
    assert cfg.base.protocol.support_radius is None  # 'none' is None (the default is 0.8)
    assert cfg.base.protocol.sharpen_temperature == 0.1
    assert cfg.base.model.archs == ("mlp", "cnn") and cfg.base.data.alpha == 0.3
    assert cfg.base.train.order == "distill-train"
    # untouched fields keep their defaults
    assert cfg.base.train.local_steps == 30 and cfg.base.rounds == 20


def _start_cli(args: list, stderr) -> subprocess.Popen:
    """``python -m tallytrain.cli args`` in its own process, on this checkout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "tallytrain.cli"] + args,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def test_ctrl_c_stops_in_one_line_keeps_the_checkpoint_and_resumes(tmp_path):
    slow = [
        "--peers",
        "4",
        "--rounds",
        "30",
        "--local-steps",
        "40",
        "--hidden",
        "16",
        "--probes-per-round",
        "40",
        "--alpha",
        "0.5",
        "--min-shard-size",
        "5",
        "--quiet",
    ]
    args = ["run", "--method", "tallytrain", "--out", str(tmp_path / "stopped")] + slow
    run_dir = tmp_path / "stopped" / "runs" / "tallytrain" / "seed0"
    proc = _start_cli(args, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(
                read_jsonl(str(run_dir / "metrics.jsonl"))
            ) >= 3:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"tallytrain: stopped; the finished rounds are saved in "
        f"{tmp_path / 'stopped'}. Continue with: tallytrain run "
    )
    resume = shlex.split(err.split("Continue with: ", 1)[1])
    assert resume[1:] == args + ["--resume"]
    # the checkpoint is intact: it loads, and holds the rounds its metrics say
    import torch

    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert 3 <= state["round"] < 30 and len(state["metrics"]) == state["round"]
    assert main(resume[1:]) == 0
    whole = str(tmp_path / "whole")
    assert main(["run", "--method", "tallytrain", "--out", whole] + slow) == 0
    a = read_jsonl(str(tmp_path / "stopped" / "metrics.jsonl"))
    assert len(a) == 30 and without_timing(a) == without_timing(
        read_jsonl(os.path.join(whole, "metrics.jsonl"))
    )


def test_every_option_has_help_beyond_its_default():
    """Help comes from cli.HELP: a config field added without an entry there
    fails here, as does an entry for a field that no longer exists."""
    from tallytrain import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command in ("run", "compare", "pareto", "ablate", "bench", "info"):
        for action in commands[command]._actions:
            if action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            text = re.sub(r"\s*\(default: [^)]*\)\s*$", "", action.help or "")
            assert text.strip(), f"{command} {action.option_strings} has no help"
    assert set(cli.HELP) == set(option_fields())
    compare_help = commands["compare"].format_help()
    # argparse may wrap a line after the hyphen of a name (softlabel-topk)
    flat = re.sub(r"-\s+", "-", " ".join(compare_help.split()))
    assert "(default: all = " + ", ".join(method_names()) + ", softlabel-matched)" in flat
    assert "(default: 1)" in " ".join(
        commands["compare"]._option_string_actions["--seeds"].help.split()
    )


def test_version(capsys):
    assert main(["--version"]) == 0
    from tallytrain import __version__

    assert capsys.readouterr().out.startswith(f"tallytrain {__version__} (torch ")


def test_one_seed_has_no_spread(tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["run", "--method", "local", "--out", str(out)] + TINY) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| local")]
    assert len(row) == 1 and " ± – |" in row[0] and "± 0.000" not in row[0]
    summary = json.load(open(out / "summary.json"))
    assert summary["methods"]["local"]["final_accuracy_std"] is None


def test_progress_without_a_terminal_prints_every_few_rounds():
    from tallytrain.app.progress import Progress

    stream = io.StringIO()  # not a terminal
    progress = Progress(24, stream=stream, every=5)
    for r in range(12):
        progress.advance(f"tallytrain seed 0 round {r + 1}/12", run_finished=r == 11)
    for r in range(12):
        progress.advance(f"local seed 0 round {r + 1}/12", run_finished=r == 11)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("rounds  ")[1].split("  elapsed")[0] for line in lines] == [
        "tallytrain seed 0 round 5/12",
        "tallytrain seed 0 round 10/12",
        "tallytrain seed 0 round 12/12",
        "local seed 0 round 5/12",
        "local seed 0 round 10/12",
        "local seed 0 round 12/12",
    ]
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    Progress(3, enabled=False, stream=quiet).advance("x", run_finished=True)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("cuda", ["unavailable", "native"])
def test_info_says_whether_cuda_kernels_are_usable_or_only_registered(monkeypatch, capsys, cuda):
    from tallytrain import ops

    usable = cuda != "unavailable"
    info = {
        "mode": "auto",
        "cpu": "native",
        "cuda": cuda,
        "ops": {
            "pack_argmax": {
                "cpu": "native",
                "cuda": "native" if usable else cuda,
                "cuda_kernel": "registered",
            },
            "tally": {
                "cpu": "native",
                "cuda": "reference" if usable else cuda,
                "cuda_kernel": "none",
            },
        },
        "extension": "/x/_C.so",
        "extension_built_with_cuda": True,
        "native_error": None,
        "torch": "2.14",
        "torch_cuda": "13.0",
        "cuda_device": None,
    }
    monkeypatch.setattr(ops, "backend_info", lambda: info)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()
        if line.strip().startswith(("pack_argmax", "tally "))
    }
    if cuda == "unavailable":
        assert "CUDA ops served by: none (no usable CUDA device)" in text
        assert rows == {
            "pack_argmax": ["native", "registered"],
            "tally": ["native", "none", "(reference)"],
        }
    else:
        assert "CUDA ops served by: native" in text
        assert rows == {"pack_argmax": ["native", "native"], "tally": ["native", "reference"]}
    assert "cuda=native" not in text


def test_pareto_refuses_merge_periods_longer_than_the_run(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["pareto", "--out", str(out), "--periods", "1,5"] + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("tallytrain: error: --periods 5 exceed the 2 rounds")
    assert main(["pareto", "--out", str(out), "--bridge-periods", "3"] + TINY) == 2
    assert capsys.readouterr().err.startswith(
        "tallytrain: error: --bridge-periods 3 exceed the 2 rounds"
    )
    assert not out.exists()


def _figures(monkeypatch):
    """The figures the plot functions make, kept open instead of closed."""
    from tallytrain import report

    real = report._pyplot
    figures = []

    class Keep:
        def __getattr__(self, name):
            return getattr(real(), name)

        def close(self, fig):
            figures.append(fig)

    monkeypatch.setattr(report, "_pyplot", Keep)
    return figures


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plots_of_many_operating_points_stay_readable(tmp_path, monkeypatch):
    """A pareto study's 23 curves: every curve looks different, a method keeps
    its colour, the legend covers neither title nor data, and the pareto
    plot's labels do not overlap."""
    from tallytrain import report
    from tallytrain.app.pareto import pareto_config
    from tallytrain.fl.config import RunConfig

    cfg = pareto_config(RunConfig(rounds=20), [0])
    assert len(cfg.methods) == 23
    rows = [
        {
            "label": label,
            "method": cfg.method_of(label),
            "seed": 0,
            "round": r,
            "accuracy": 0.5 + 0.01 * i + 0.02 * r,
            "cum_bytes": (i + 1) * 1000 * (r + 1),
        }
        for i, label in enumerate(cfg.methods)
        for r in range(3)
    ]
    styles = report._styles(rows)
    assert len({tuple(sorted(s.items())) for s in styles.values()}) == 23
    for label in cfg.methods:
        same = [other for other in cfg.methods if cfg.method_of(other) == cfg.method_of(label)]
        assert {styles[o]["color"] for o in same} == {styles[label]["color"]}
    assert len({styles[label]["color"] for label in cfg.methods}) == 6  # six methods
    figures = _figures(monkeypatch)
    report.plot_accuracy_vs_round(rows, str(tmp_path / "r.png"), "a title")
    report.plot_accuracy_vs_bytes(rows, str(tmp_path / "b.png"), "a title")
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        legend = ax.get_legend().get_window_extent(renderer)
        assert not _boxes_overlap(legend, ax.get_window_extent(renderer))
        assert not _boxes_overlap(legend, ax.title.get_window_extent(renderer))
        assert len(ax.get_legend().get_texts()) == 23
    # pareto.png: fedavg at periods 5 and 10 sit close together
    points = [
        {
            "label": label,
            "method": cfg.method_of(label),
            "setting": f"every {i} rounds",
            "final_accuracy_mean": 0.80 + 0.001 * (i % 3),
            "final_accuracy_std": None,
            "total_bytes": 10_000 * (1 + i % 4),
            "on_frontier": i == 0,
        }
        for i, label in enumerate(cfg.methods)
    ]
    figures.clear()
    report.plot_pareto(points, str(tmp_path / "p.png"), "a title")
    ax = figures[0].axes[0]
    renderer = figures[0].canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 23
    assert not [(i, j) for i in range(23) for j in range(i) if _boxes_overlap(boxes[i], boxes[j])]
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_bench_runs_from_the_installed_package(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--ops", "unpack_labels", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    header = "| op | case | served | level | native ms | plain ms | ratio |"
    assert header in out and "\n| unpack_labels | N=" in out
    record = json.load(open(path))
    assert record["command"].startswith("tallytrain bench --quick")
    assert [row["op"] for row in record["rows"]] == ["unpack_labels"]
    assert main(["bench", "--ops", "nope"]) == 2
    assert capsys.readouterr().err == (
        "tallytrain: error: --ops: unknown op(s) nope; known: "
        "pack_argmax, tally, topk_sparse, topk_sparse_ef, "
        "sparse_merge, unpack_labels\n"
    )


def test_the_checkout_benchmark_command_is_the_same_table():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ops", "--quick", "--ops", "unpack_labels"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| op | case | served | level | native ms | plain ms | ratio |" in proc.stdout
    assert "\n| unpack_labels | N=" in proc.stdout


def test_softlabel_matched_fits_in_tallytrains_uplink(tmp_path):
    """softlabel-matched sends float16 soft labels on as many probes as fit in
    one tallytrain VOTES message: its measured uplink is within one probe's
    soft label of tallytrain's."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "compare",
                "--methods",
                "tallytrain,softlabel-matched",
                "--rounds",
                "2",
                "--peers",
                "3",
                "--local-steps",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    up = {label: row["uplink_bytes"] for label, row in summary["methods"].items()}
    per_probe_and_peer_round = 10 * 2  # C = 10 float16 values
    assert up["softlabel-matched"] <= up["tallytrain"]
    assert up["tallytrain"] - up["softlabel-matched"] < per_probe_and_peer_round * 3 * 2


def test_ablate_runs_one_row_per_mechanism_off(tmp_path, capsys):
    """tallytrain ablate: the recipe, each mechanism off alone (its override
    recorded in config.json), softlabel; a table and a plot."""
    from tallytrain.app.ablate import ABLATIONS

    out = tmp_path / "abl"
    assert (
        main(
            [
                "ablate",
                "--rounds",
                "2",
                "--peers",
                "3",
                "--local-steps",
                "2",
                "--abstain-below",
                "0.2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    table = (out / "ablation.md").read_text()
    for name in ABLATIONS:
        assert f"| tallytrain-{name} |" in table
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["tallytrain-no-memory"]["protocol"] == {"memory_max_age": 1}
    assert settings["tallytrain-no-schedule"]["train"] == {"distill_epochs": 0.0}
    rows = json.loads((out / "ablation.json").read_text())
    assert rows[0]["label"] == "tallytrain" and rows[0]["change"] == 0
    assert (out / "ablation.png").stat().st_size > 0


def _children(pid: int) -> list:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_workers_end_when_the_parent_is_killed(tmp_path):
    # A parent killed outright (SIGKILL: no cleanup runs) must not leave its
    # workers running and writing run directories.
    args = ["compare", "--methods", "tallytrain,softlabel", "--seeds", "2", "--jobs", "2"]
    args += ["--rounds", "3000", "--peers", "4", "--alpha", "0.5", "--min-shard-size", "5"]
    args += ["--hidden", "16", "--probes-per-round", "40", "--quiet", "--out", str(tmp_path / "o")]
    proc = _start_cli(args, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: list = []
        while time.time() < deadline and proc.poll() is None:
            metrics = list((tmp_path / "o").glob("runs/*/seed*/metrics.jsonl"))
            workers = [w for w in _children(proc.pid) if "spawn" in _cmdline(w)]
            if len(workers) == 2 and metrics:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) == 2, (
            "the run ended before the test could kill it"
        )
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 10  # each run takes minutes: only the kill ends them
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        left = [w for w in workers if _alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, f"workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
