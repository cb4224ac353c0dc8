"""The simulator on your own data and model: tallytrain.simulate, plugins
(--plugin), the fallback for models vmap cannot batch, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import tallytrain
from tallytrain.app import plugins, register_dataset, register_model, simulate
from tallytrain.cli import main
from tallytrain.data import DATASETS, load_dataset, prepare
from tallytrain.fl.config import DataConfig
from tallytrain.fl.registry import method_names
from tallytrain.models import ARCHS
from tallytrain.report import read_jsonl, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(
    peers=4,
    rounds=2,
    local_steps=3,
    distill_steps=2,
    batch_size=16,
    distill_batch_size=16,
    probes_per_round=40,
    server_distill_steps=2,
    alpha=0.5,
    min_shard_size=5,
)


@pytest.fixture(autouse=True)
def clean_tables():
    """Registrations made by a test are removed after it, so that tests do
    not see each other's names."""
    datasets, archs = dict(DATASETS), dict(ARCHS)
    loaded, from_plugins = list(plugins._plugins), set(plugins._from_plugins)
    yield
    for table, saved in (
        (DATASETS, datasets),
        (ARCHS, archs),
        (plugins._plugins, loaded),
        (plugins._from_plugins, from_plugins),
    ):
        table.clear()
        table.update(saved) if isinstance(table, (dict, set)) else table.extend(saved)


def blobs(n: int = 400, classes: int = 3, dim: int = 6, seed: int = 0):
    """Gaussian blobs: (x float32 [n, dim], y int64 [n])."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def mlp(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, num_classes))


class Branchy(nn.Module):
    """mlp() with a branch on the data: vmap cannot batch it (data-dependent
    control flow), though it computes exactly what mlp() computes."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = mlp(num_classes)

    def forward(self, x):
        out = self.net(x)
        if bool(torch.isfinite(out).all()):
            return out
        return out.nan_to_num()


class Plain(Branchy):
    def forward(self, x):
        return self.net(x)


def test_simulate_runs_every_method_on_own_tensors_and_model(tmp_path):
    out = tmp_path / "own"
    summary = simulate(blobs(), mlp, str(out), methods="all", seeds=[0, 1], progress=False, **TINY)
    assert list(summary["methods"]) == method_names()
    for m in summary["methods"].values():
        assert m["seeds"] == 2 and 0.0 <= m["final_accuracy_mean"] <= 1.0
    config = json.load(open(out / "config.json"))
    assert config["base"]["data"]["dataset"] == "own"
    assert config["base"]["model"]["archs"] == ["own"]
    for name in (
        "partition.json",
        "metrics.jsonl",
        "comm.csv",
        "summary.json",
        "accuracy_vs_round.png",
    ):
        assert os.path.getsize(out / name) > 0
    # the ledger counted real messages of the methods that send some
    assert summary["methods"]["tallytrain"]["total_bytes"] > 0
    assert summary["methods"]["local"]["total_bytes"] == 0


def test_a_model_vmap_cannot_batch_runs_one_peer_per_call_with_the_same_results(tmp_path):
    methods = ["fedavg", "feddf", "tallytrain"]  # peers, the server model, distillation
    simulate(blobs(), Plain, str(tmp_path / "plain"), methods=methods, progress=False, **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulate(
            blobs(), Branchy, str(tmp_path / "branchy"), methods=methods, progress=False, **TINY
        )
    messages = {
        str(w.message) for w in caught if "cannot run under torch.func.vmap" in str(w.message)
    }
    assert len(messages) == 1 and "arch 'own'" in messages.pop()
    plain = read_jsonl(str(tmp_path / "plain" / "metrics.jsonl"))
    branchy = read_jsonl(str(tmp_path / "branchy" / "metrics.jsonl"))
    assert len(plain) == 3 * TINY["rounds"]
    assert without_timing(plain) == without_timing(branchy)


def test_own_torch_dataset_with_a_test_split_and_every_partitioner():
    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i].numpy(), int(self.y[i])  # arrays and ints are fine too

    x, y = blobs(300)
    xt, yt = blobs(60, seed=1)
    register_dataset("pairs", Pairs(x, y), test=lambda: Pairs(xt, yt))
    for partition in ("iid", "dirichlet", "classes"):
        cfg = DataConfig(dataset="pairs", partition=partition, classes_per_peer=2, min_shard_size=5)
        ds = load_dataset(cfg)
        assert ds.num_classes == 3 and torch.equal(ds.x, x) and torch.equal(ds.y_test, yt)
        data = prepare(cfg, 4, 0, ds)
        assert len(data.shards) == 4 and len(data.y_test) == 60
        assert sum(len(s) for s in data.shards) == len(data.y_train)


def test_resume_continues_and_refuses_changed_data(tmp_path):
    out = str(tmp_path / "run")
    first = simulate(blobs(), mlp, out, methods=["tallytrain"], progress=False, **TINY)
    again = simulate(blobs(), mlp, out, methods=["tallytrain"], progress=False, resume=True, **TINY)
    assert again == first
    with pytest.raises(ValueError, match="its data changed since the run began"):
        simulate(
            blobs(seed=3), mlp, out, methods=["tallytrain"], progress=False, resume=True, **TINY
        )


def plugin_file(tmp_path) -> str:
    path = tmp_path / "myplugin.py"
    path.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from tallytrain.app import register_dataset, register_model\n\n\n"
        "def blobs():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    centres = 3 * torch.randn(3, 6, generator=g)\n"
        "    y = torch.arange(400) % 3\n"
        "    return centres[y] + torch.randn(400, 6, generator=g), y\n\n\n"
        "def tiny(num_classes):\n"
        "    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, num_classes))\n\n\n"
        "register_dataset('blobs', blobs)\n"
        "register_model('tiny', tiny)\n"
    )
    return str(path)


def test_plugin_from_the_command_line_with_worker_processes(tmp_path, capsys):
    args = [
        "compare",
        "--plugin",
        plugin_file(tmp_path),
        "--dataset",
        "blobs",
        "--archs",
        "tiny",
        "--methods",
        "fedavg,tallytrain",
        "--seeds",
        "2",
        "--quiet",
        "--peers",
        "4",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--probes-per-round",
        "40",
        "--min-shard-size",
        "5",
    ]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    assert "| tallytrain |" in capsys.readouterr().out
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    two = read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
    assert len(one) == 2 * 2 * 2 and without_timing(one) == without_timing(two)


def test_example_own_data_simulator_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "rings"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "own_data_simulator.py"),
            "--out",
            str(out),
            "--rounds",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| tallytrain |" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert list(summary["methods"]) == ["local", "fedavg", "softlabel", "tallytrain"]


def test_simulate_is_the_top_level_entry_point():
    assert tallytrain.simulate is simulate


class WithRunningStats(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.bn(x))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda out: simulate((torch.randn(50, 6), torch.rand(50)), mlp, out, **TINY),
            "labels must be integers",
        ),
        (
            lambda out: simulate(
                (torch.randn(50, 6), torch.zeros(40, dtype=torch.long)), mlp, out, **TINY
            ),
            "labels must be [N] with one label per input (50)",
        ),
        (
            lambda out: simulate(blobs(), lambda c: "not a module", out, **TINY),
            "the factory returned str, not a torch.nn.Module",
        ),
        (
            lambda out: simulate(blobs(), WithRunningStats, out, **TINY),
            "has persistent buffers (bn.running_mean, bn.running_var, bn.num_batches_tracked)",
        ),
        (
            lambda out: simulate(blobs(), mlp, out, model_name="mlp", **TINY),
            "model 'mlp' is built in",
        ),
        (
            lambda out: simulate(blobs(), lambda c: mlp(c), out, jobs=2, methods=["local"], **TINY),
            "model 'own' cannot be sent to worker processes (jobs > 1)",
        ),
        (lambda out: simulate(blobs(), mlp, out, lr=0, **TINY), "lr must be > 0"),
        (
            lambda out: simulate(blobs(), mlp, out, learning_rate=0.1, **TINY),
            "unknown option(s) learning_rate",
        ),
        (
            lambda out: simulate(blobs(), mlp, out, num_classes=2, **TINY),
            "labels must lie in 0..1, got 0..2",
        ),
    ],
)
def test_bad_own_data_or_model_is_a_clear_error_and_writes_nothing(tmp_path, call, message):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError) as info:
        call(out)
    assert message in str(info.value)
    assert not os.path.exists(out)


def test_plugins_restore_in_a_worker_what_the_parent_registered(tmp_path):
    register_dataset("mine", blobs)
    register_model("mine", mlp)
    plugins.load_plugin(plugin_file(tmp_path))
    assert plugins.portable(["digits"], ["mlp"]) == plugins.portable()  # only the plugin
    blob = plugins.portable(["mine", "blobs"], ["mine", "tiny"])
    # a fresh process stands for the worker: it sees the module plugin's and
    # the parent's own registrations
    code = (
        "import sys, tallytrain.app.plugins as p\n"
        "from tallytrain.data import DATASETS\nfrom tallytrain.models import ARCHS\n"
        "p.restore(sys.stdin.buffer.read())\n"
        "print(sorted(set(DATASETS) & {'mine', 'blobs'}),"
        " sorted(set(ARCHS) & {'mine', 'tiny'}))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", code], input=blob, env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["['blobs',", "'mine']", "['mine',", "'tiny']"]
