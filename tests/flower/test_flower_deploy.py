"""Flower's engines for real: one SuperLink and three SuperNodes as separate
processes on 127.0.0.1 (the deployment engine), or one SuperLink simulating
them (the simulation engine), the example app submitted with ``flwr run``,
offline (telemetry off, no run-time dependency installation,
a temporary Flower home per process).

Each SuperNode reads its own data file, named by its node config, from a
directory of its own; the server and the nodes read the shared probes from
the run config's ``app.data-dir``. The files hold the simulator's split
(the example's make_data), so the runs are compared with the simulator
running the example's model.

Every process the deployment starts carries a marker in its environment, so
the tests find them all -- including the ones Flower detaches into sessions
of their own -- stop them afterwards, and check that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

pytest.importorskip("flwr")

import tallytrain  # noqa: E402
from tallytrain.app.plugins import register_model  # noqa: E402
from tallytrain.data import prepare  # noqa: E402
from tallytrain.fl.loop import Federation  # noqa: E402
from tallytrain.flower import parse_run_config  # noqa: E402
from tallytrain.flower.config import torch_threads  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
# The Flower processes import the tallytrain this test imports (with its
# native extension, if it has one), and use this environment's Flower.
TALLYTRAIN_ROOT = Path(tallytrain.__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.flower,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="finds the deployment's processes through /proc",
    ),
    pytest.mark.skipif(
        not (BIN / "flower-superlink").exists(), reason=f"Flower's commands are not in {BIN}"
    ),
]

MARKER = "TALLYTRAIN_FLOWER_TEST"
NODES = 3
# Small enough that a round takes seconds; every node is a fresh process per
# message (torch import, data split), which dominates the time.
ROUND_TIMEOUT = 60.0  # seconds, for the test that kills a node mid-round
RUN_CONFIG = {
    "peers": NODES,
    "train.local-steps": 10,
    "train.distill-steps": 10,
    "protocol.probes-per-round": 64,
    "protocol.abstain-below": 0.5,
    "model.hidden": 16,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(tag: str) -> List[int]:
    """Pids of live processes whose environment holds MARKER=tag."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if needle in env and state != b"Z":
            found.append(int(entry))
    return found


class Deployment:
    """A SuperLink and SuperNodes on loopback, each in its own process group
    and its own temporary Flower home."""

    def __init__(self, root: Path):
        self.root = root
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.procs: Dict[str, subprocess.Popen] = {}
        home = root / "home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        # SuperExec polls for work every second by default; a tenth of that
        # takes seconds off every round.
        # Ray (the simulation engine) keeps its session files in a directory of
        # its own, short because it holds Unix sockets (at most 107 characters).
        self.ray_tmp = tempfile.mkdtemp(prefix="tt-ray-")
        self.env = dict(
            os.environ,
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_HOME=str(home),
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
            RAY_TMPDIR=self.ray_tmp,
            **{MARKER: self.tag},
        )
        # Flower starts its helpers (flower-superexec, flwr-clientapp) by name;
        # the app imports tallytrain from this checkout.
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(TALLYTRAIN_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        )

    def _start(self, name: str, args: List[str], env: Dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        with log:
            self.procs[name] = subprocess.Popen(
                [str(BIN / args[0])] + args[1:],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def write_data(self, run_config: dict) -> None:
        """The example's files for ``run_config``: node i's own file in a
        directory of its own (as on its machine), the shared file in data/."""
        cfg, _ = parse_run_config(run_config)
        self.data_dir = self.root / "data"
        sys.path.insert(0, str(APP))
        try:
            from tallytrain_app.make_data import write_files
        finally:
            sys.path.remove(str(APP))
        write_files(str(self.data_dir), cfg)
        for i in range(cfg.peers):
            machine = self.root / f"machine{i}"
            machine.mkdir()
            (self.data_dir / f"node{i}.pt").rename(machine / "train.pt")

    def start(self, nodes: int, simulation: bool = False) -> None:
        """A SuperLink and ``nodes`` SuperNodes, each node with its own data
        file; with ``simulation``, a SuperLink that simulates the nodes itself
        (Flower's simulation engine; the nodes then find their files as
        <app.data-dir>/node<i>.pt)."""
        self.simulated_nodes = nodes if simulation else 0
        self._start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ]
            + (["--simulation"] if simulation else []),
            self.env,
        )
        for i in range(0 if simulation else nodes):
            home = self.root / f"home-node{i}"  # each node installs the app on its own
            home.mkdir()
            self._start(
                f"node{i}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={nodes} "
                    f'data-file="{self.root / f"machine{i}" / "train.pt"}"',
                ],
                dict(self.env, FLWR_HOME=str(home)),
            )
        wait_for(self.superlink_listens, 60, "the SuperLink to listen", self)

    def superlink_listens(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def submit(self, run_config: dict, report: Path) -> subprocess.Popen:
        """``flwr run`` of the example app; its output goes to flwr-run.log."""
        overrides = " ".join(
            f"{k}={json.dumps(v)}"
            for k, v in {
                **run_config,
                "flower.report": str(report),
                "app.data-dir": str(self.data_dir),
            }.items()
        )
        log = open(self.root / "flwr-run.log", "wb")
        with log:
            federation = (
                ["--federation-config", f"num-supernodes={self.simulated_nodes}"]
                if self.simulated_nodes
                else []
            )
            proc = subprocess.Popen(
                [
                    str(BIN / "flwr"),
                    "run",
                    str(APP),
                    "loopback",
                    "--run-config",
                    overrides,
                    "--stream",
                ]
                + federation,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs["flwr-run"] = proc
        return proc

    def kill_node(self, i: int) -> None:
        """SIGKILL a SuperNode with its running ClientApp (same process group)."""
        os.killpg(self.procs[f"node{i}"].pid, signal.SIGKILL)

    def stop(self) -> List[int]:
        """Stop everything; returns the marked processes still alive afterwards."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in marked_processes(self.tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while marked_processes(self.tag) and time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()  # reap our direct children
                time.sleep(0.1)
        for proc in self.procs.values():
            proc.poll()
        return marked_processes(self.tag)

    def explain(self) -> str:
        return "\n".join(
            f"--- {name}.log (tail) ---\n{self.log(name)[-3000:]}"
            for name in ["flwr-run", "superlink"]
            + sorted(n for n in self.procs if n.startswith("node"))
        )


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()
        shutil.rmtree(dep.ray_tmp, ignore_errors=True)


def wait_for(condition, timeout: float, what: str, dep: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{dep.explain()}")
        time.sleep(0.2)


def finish(dep: Deployment, proc: subprocess.Popen, report: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {timeout} s\n{dep.explain()}")
    if not report.exists():
        pytest.fail(
            f"the ServerApp wrote no report (flwr run exit code {proc.returncode})\n{dep.explain()}"
        )
    return json.loads(report.read_text())


def simulator(run_config: dict) -> Federation:
    """The in-process simulator on the same split, with the example's model."""
    sys.path.insert(0, str(APP))
    try:
        from tallytrain_app.task import make_model
    finally:
        sys.path.remove(str(APP))
    register_model("example-mlp", make_model, replace=True)
    cfg, _ = parse_run_config({**run_config, "model.archs": "example-mlp"})
    return Federation(cfg, prepare(cfg.data, cfg.peers, cfg.seed))


@pytest.mark.timeout(420)
def test_two_rounds_on_three_supernodes_match_the_simulator(deployment, tmp_path):
    run_config = {**RUN_CONFIG, "rounds": 2}
    deployment.write_data(run_config)
    deployment.start(NODES)
    report_path = tmp_path / "report.json"
    report = finish(deployment, deployment.submit(run_config, report_path), report_path, 300)

    assert report["missing_peers"] == [] and len(report["rounds"]) == 2
    assert report["final_accuracy"] > report["initial_accuracy"]
    # The in-process simulator, same seed and setting: same bytes, same models.
    sim = simulator(run_config)
    for row in report["rounds"]:
        with torch_threads(1):  # as the ClientApps (flower.threads = 1)
            expected = sim.run_round(row["round"])
        for key in (
            "bytes_up",
            "bytes_down",
            "bytes",
            "peer_acc_mean",
            "consensus_acc",
            "agreement",
        ):
            assert row[key] == expected[key], key
    assert report["totals"] == sim.ledger.totals()

    assert deployment.stop() == [], "Flower processes survived the stop"


@pytest.mark.timeout(420)
def test_a_supernode_killed_mid_round_is_reported_missing(deployment, tmp_path):
    # The round timeout leaves the two live nodes time to answer on a busy
    # machine (each answer starts a ClientApp process and loads its shard).
    run_config = {**RUN_CONFIG, "rounds": 1, "flower.round-timeout": ROUND_TIMEOUT}
    deployment.write_data(run_config)
    deployment.start(NODES)
    report_path = tmp_path / "report.json"
    proc = deployment.submit(run_config, report_path)
    # Node 2 has received round 0's instruction and its ClientApp is working.
    wait_for(
        lambda: "Receiving: train message" in deployment.log("node2"),
        240,
        "node 2 to receive round 0",
        deployment,
    )
    deployment.kill_node(2)
    report = finish(deployment, proc, report_path, 240)

    (row,) = report["rounds"]
    assert row["answered_peers"] == [0, 1] and row["missing_peers"] == [2]
    assert report["missing_peers"] == [2]
    # Either the server's wait ran out, or, at the same moment, the SuperLink
    # answered for the dead node that the message's TTL (the round timeout)
    # expired.
    why = row["failures"]["2"]
    # Or the SuperLink, missing the dead node's heartbeats, answered for it
    # before the round timeout ran out.
    assert (
        "flower.round-timeout" in why or "Message Unavailable" in why or "Node Unavailable" in why
    ), why
    if "flower.round-timeout" in why:
        assert row["round_seconds"] >= ROUND_TIMEOUT
    # The votes that arrived were tallied: two peers' votes, three control messages.
    sim = simulator(run_config)
    with torch_threads(1):
        expected = sim.run_round(0)
    assert row["bytes_down"] == expected["bytes_down"]
    assert row["bytes_up"] == expected["bytes_up"] * 2 // 3

    assert deployment.stop() == [], "Flower processes survived the stop"


@pytest.mark.timeout(420)
def test_simulation_engine_matches_the_simulator(deployment, tmp_path):
    """Flower's simulation engine runs several nodes' ClientApps in one
    worker process, which exercises restoring each peer from its node state."""
    run_config = {**RUN_CONFIG, "rounds": 2}
    deployment.write_data(run_config)
    for i in range(NODES):  # one directory: the simulated nodes share the machine
        (deployment.root / f"machine{i}" / "train.pt").rename(deployment.data_dir / f"node{i}.pt")
    deployment.start(NODES, simulation=True)
    report_path = tmp_path / "report.json"
    report = finish(deployment, deployment.submit(run_config, report_path), report_path, 300)

    assert report["missing_peers"] == [] and len(report["rounds"]) == 2
    sim = simulator(run_config)
    for row in report["rounds"]:
        with torch_threads(1):  # as the ClientApps (flower.threads = 1)
            expected = sim.run_round(row["round"])
        for key in ("bytes", "peer_acc_mean", "peer_acc_min", "consensus_acc"):
            assert row[key] == expected[key], key

    assert deployment.stop() == [], "Flower processes survived the stop"
