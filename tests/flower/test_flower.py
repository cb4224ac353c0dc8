"""The Flower adapter in one process: the run config, the records, the client
logic and the strategy, driven through a fake in-process Grid (no Flower
processes; those are in test_flower_deploy.py)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from tallytrain import wire  # noqa: E402
from tallytrain.comm import SERVER, Envelope  # noqa: E402
from tallytrain.data import prepare  # noqa: E402
from tallytrain.fl.config import (
    ModelConfig,
    ProtocolConfig,
    RunConfig,  # noqa: E402
    TrainConfig,
)
from tallytrain.fl.loop import Federation  # noqa: E402
from tallytrain.flower import (
    FlowerOptions,
    SharedData,
    TallyTrainStrategy,  # noqa: E402
    parse_run_config,
)
from tallytrain.flower import client, records  # noqa: E402
from tallytrain.flower.config import torch_threads  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def server_identity():
    """Flower's Message constructor stamps the sender's identity, which a
    ServerApp process has set before calling main(); so does this fixture."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = saved


def small_config(
    method: str = "tallytrain", archs=("mlp",), peer_batch: int = 0, **protocol
) -> RunConfig:
    return RunConfig(
        method=method,
        peers=3,
        rounds=2,
        model=ModelConfig(archs=archs, hidden=16),
        train=TrainConfig(local_steps=8, distill_steps=8, peer_batch=peer_batch),
        protocol=ProtocolConfig(probes_per_round=64, **protocol),
    )


class FakeGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context
    (node config and persistent state) per node, as a SuperNode keeps them.

    ``silent`` nodes receive nothing and never answer, like a node killed
    mid-round: send_and_receive returns without their replies, as Flower's
    does when its timeout expires. ``offline`` nodes are no longer listed."""

    def __init__(self, app, num_nodes: int, num_partitions: int = None):
        self.app = app
        parts = num_nodes if num_partitions is None else num_partitions
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": i, "num-partitions": parts},
            )
            for i in range(num_nodes)
        }
        self.silent, self.offline = set(), set()
        self.sent = []  # (message type, destination node) of every message
        self._replies = {}
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's InMemoryGrid
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            if node in self.silent or node in self.offline:
                continue
            try:
                self._replies[msg.metadata.message_id] = self.app(msg, self.contexts[node])
            except Exception as exc:  # Flower turns a ClientApp exception into an error reply
                self._replies[msg.metadata.message_id] = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg
                )
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the strategy polls with push_messages / pull_messages")


def strategy_for(cfg: RunConfig, data=None, **options) -> TallyTrainStrategy:
    return TallyTrainStrategy(cfg, FlowerOptions(**options), data)


# ---- the run config --------------------------------------------------------------------
def test_parse_run_config_maps_every_section():
    cfg, options = parse_run_config(
        {
            "method": "softlabel",
            "peers": 4,
            "seed": 7,
            "data.alpha": 1,
            "model.archs": "mlp, cnn",
            "train.local-steps": 3,
            "protocol.abstain-below": "none",
            "protocol.agreement-threshold": 0.25,
            "flower.round-timeout": 9,
            "flower.threads": 2,
        }
    )
    assert (cfg.method, cfg.peers, cfg.seed) == ("softlabel", 4, 7)
    assert cfg.data.alpha == 1.0 and isinstance(cfg.data.alpha, float)
    assert cfg.model.archs == ("mlp", "cnn")
    assert cfg.train.local_steps == 3 and cfg.protocol.abstain_below is None
    assert cfg.protocol.agreement_threshold == 0.25
    assert options == FlowerOptions(round_timeout=9.0, threads=2)
    assert parse_run_config({}) == (RunConfig(), FlowerOptions())


@pytest.mark.parametrize(
    "user_config, match",
    [
        ({"train.local-stepz": 3}, "train.local-stepz"),
        ({"rounds": "3"}, "'rounds' takes a int"),
        ({"protocol.decentralized": 1}, "takes a bool"),
        ({"flower.round-timeout": 0}, "flower.round-timeout must be > 0"),
        ({"flower.threads": 0}, "flower.threads must be >= 1"),
        ({"flower.report": "out.json"}, "flower.report must be an absolute path"),
        ({"peers": 0}, "peers must be >= 1"),
    ],
)
def test_parse_run_config_errors_name_the_key(user_config, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(user_config)


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---- records ---------------------------------------------------------------------------
def test_envelopes_round_trip_through_a_record():
    msg = wire.encode_consensus(torch.tensor([1, 0, 2]), 3, round=4, sender=wire.SERVER)
    ctrl = wire.encode_control(
        round=5, probe_seed=9, num_probes=3, consensus=msg, sender=wire.SERVER
    )
    content = records.instruction(
        "{}", 1, 5, 2, [Envelope(SERVER, 2, ctrl, wire.MessageKind.CONTROL)]
    )
    record = content.config_records[records.RECORD]
    (env,) = records.unpack_envelopes(record, SERVER, 2)
    assert env == Envelope(SERVER, 2, ctrl, wire.MessageKind.CONTROL)
    assert (record["round"], record["peer"], record["threads"]) == (5, 2, 1)


def test_malformed_records_are_wire_errors():
    record = records.instruction("{}", 1, 0, 0, []).config_records[records.RECORD]
    record["kinds"] = [int(wire.MessageKind.VOTES)]
    with pytest.raises(wire.WireFormatError, match="1 kinds"):
        records.unpack_envelopes(record, SERVER, 0)
    record["messages"], record["kinds"] = [b"x"], [250]
    with pytest.raises(wire.WireFormatError, match="250"):
        records.unpack_envelopes(record, SERVER, 0)
    del record["kinds"]
    with pytest.raises(wire.WireFormatError, match="lacks 'kinds'"):
        records.unpack_envelopes(record, SERVER, 0)


def test_a_reply_goes_to_the_server_only():
    votes = wire.encode_votes(torch.zeros(2, dtype=torch.uint8), 4, 10, round=0, sender=1)
    with pytest.raises(ValueError, match="decentralized"):
        records.reply(1, [Envelope(1, 2, votes, wire.MessageKind.VOTES)], 0.5)


def test_peer_state_round_trips():
    state = RecordDict()
    assert records.load_peer_state(state) is None
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    records.save_peer_state(state, params, {"previous": None, "residual": torch.ones(4)})
    loaded, method_state = records.load_peer_state(state)
    assert loaded.keys() == params.keys() and all(torch.equal(loaded[k], params[k]) for k in params)
    assert method_state["previous"] is None and torch.equal(method_state["residual"], torch.ones(4))


# ---- the client ------------------------------------------------------------------------
def test_client_needs_its_partition_in_the_node_config():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="partition-id and num-partitions.*--node-config"):
        client.partition_of(ctx)


def test_client_refuses_a_message_for_another_peer():
    grid = FakeGrid(client.app, 2)
    content = records.instruction(records.config_json(small_config()), 1, 0, 1, [])
    with pytest.raises(ValueError, match="addressed peer 1 but this node serves partition-id 0"):
        client.run_peer_round(content, grid.contexts[1000])


def test_client_refuses_a_run_with_another_peer_count():
    grid = FakeGrid(client.app, 2, num_partitions=2)
    content = records.instruction(records.config_json(small_config()), 1, 0, 0, [])
    with pytest.raises(ValueError, match="num-partitions=2 but the run has 3 peers"):
        client.run_peer_round(content, grid.contexts[1000])


# ---- the strategy ----------------------------------------------------------------------
def test_decentralized_is_refused():
    with pytest.raises(ValueError, match="decentralized"):
        TallyTrainStrategy(small_config(decentralized=True))


def test_connect_maps_nodes_to_peers_and_checks_partitions():
    cfg = small_config()
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    strategy = strategy_for(cfg, data, node_timeout=0.1)
    strategy.connect(FakeGrid(client.app, 3))
    assert strategy.peer_nodes == {0: 1000, 1: 1001, 2: 1002}
    with pytest.raises(ValueError, match="num-partitions=4, but the run has 3 peers"):
        strategy_for(cfg, data, node_timeout=0.1).connect(FakeGrid(client.app, 3, 4))


# A node trains its peer alone. The simulator's vectorised MLP training of all
# peers at once gives bit-identical parameters; for the CNN it does not (the
# batched convolution sums in another order), so there the simulator must run
# one peer per call: peer_batch=1 (docs/flower.md).
@pytest.mark.parametrize(
    "method, archs, peer_batch, protocol",
    [
        ("tallytrain", ("mlp",), 0, {}),
        ("fedavg", ("mlp",), 0, {}),
        ("tallytrain", ("cnn", "mlp"), 1, {}),
        ("fedavg", ("mlp",), 0, {"merge_period": 2, "participation": 0.67}),
        ("bridge", ("mlp",), 0, {"merge_period": 1, "topk_fraction": 0.05}),
        (
            "bridge",
            ("mlp",),
            0,
            {
                "merge_period": 1,
                "topk_fraction": 0.05,
                "participation": 0.67,
                "param_dtype": "float16",
            },
        ),
    ],
)
def test_strategy_matches_the_simulator_round_by_round(method, archs, peer_batch, protocol):
    """Parity: same seed and setting -> the same server state (for tallytrain
    the encoded consensus), the same bytes and the same peer accuracies, round
    by round. The client's Federation cache is dropped before every round and
    every reply step, so each starts as in a fresh ClientApp process, from
    context.state."""
    cfg = small_config(method, archs, peer_batch, **protocol)
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    sim = Federation(cfg, data)
    strategy = strategy_for(cfg, data)
    grid = FakeGrid(client.app, 3)
    strategy.connect(grid)
    app = grid.app
    grid.app = lambda msg, ctx: (client._federation.cache_clear(), app(msg, ctx))[1]
    for r in range(cfg.rounds):
        with torch_threads(1):  # as `tallytrain run` and the ClientApp (flower.threads)
            expected = sim.run_round(r)
        row = strategy.run_round(grid, r)
        assert row["missing_peers"] == [] and len(row["answered_peers"]) >= 2
        keys = [
            "bytes",
            "bytes_up",
            "bytes_down",
            "cum_bytes",
            "accuracy",
            "consensus_acc",
            "agreement",
            "kept_fraction",
            "global_acc",
        ]
        # Peers report their accuracy when they take part; with partial
        # participation only bridge hears from every peer (its reply goes to all).
        if cfg.protocol.participation == 1 or method == "bridge":
            keys += ["peer_acc_mean", "peer_acc_min", "peer_acc_max"]
        for key in keys:
            assert row[key] == expected[key], key
        # The server's part of the method state (peers keep the rest on their nodes).
        peer_keys = set(sim.method.peer_state_keys)
        assert _same_state(
            {k: v for k, v in strategy.fed.method.state_dict().items() if k not in peer_keys},
            {k: v for k, v in sim.method.state_dict().items() if k not in peer_keys},
        )
    if method == "tallytrain":
        labels = wire.decode(strategy.fed.method.previous).labels
        assert torch.equal(labels, wire.decode(sim.method.previous).labels)
    assert strategy.fed.ledger.entries == sim.ledger.entries
    # Each node's saved model is the simulator's model of its peer.
    for p, node in strategy.peer_nodes.items():
        saved = records.load_peer_state(grid.contexts[node].state)
        # A peer never selected has saved nothing: it still has its initial model.
        params = (
            saved[0]
            if saved is not None
            else Federation(cfg, data).population.state_dict()[sim.population.where[p][0]]
        )
        if saved is None:
            params = {k: v[sim.population.where[p][1]] for k, v in params.items()}
        group_index, row = sim.population.where[p]
        group = sim.population.groups[group_index]
        assert all(torch.equal(params[k], group.params[k][row]) for k in group.params)


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_a_silent_peer_is_reported_missing_and_the_round_completes():
    cfg = small_config()
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    strategy = strategy_for(cfg, data, round_timeout=0.5)
    grid = FakeGrid(client.app, 3)
    strategy.connect(grid)
    grid.silent.add(1001)
    row = strategy.run_round(grid, 0)
    assert row["answered_peers"] == [0, 2] and row["missing_peers"] == [1]
    assert "no reply within flower.round-timeout = 0.5 s" in row["failures"]["1"]
    # The server sent to all three, and heard from two.
    one_up = wire.votes_message_bytes(64, 10, abstain=True)
    assert row["bytes_up"] == 2 * one_up
    assert row["bytes_down"] == 3 * wire.control_message_bytes()
    with pytest.raises(ValueError, match="round 0 requested but the run is at round 1"):
        strategy.run_round(grid, 0)
    grid.offline.add(1001)
    row = strategy.run_round(grid, 1)
    assert row["missing_peers"] == [1] and "no longer connected" in row["failures"]["1"]
    assert ("train", 1001) not in grid.sent[-3:]
    report = strategy.report()
    assert report["missing_peers"] == [1] and len(report["rounds"]) == 2


def test_an_error_reply_is_reported_and_no_answer_at_all_fails():
    cfg = small_config()
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    strategy = strategy_for(cfg, data, round_timeout=0.5)
    grid = FakeGrid(client.app, 3)
    strategy.connect(grid)
    grid.contexts[1002].node_config["partition-id"] = 0  # now claims another peer
    row = strategy.run_round(grid, 0)
    assert row["missing_peers"] == [2]
    assert "error reply" in row["failures"]["2"]
    assert "serves partition-id 0" in row["failures"]["2"]
    grid.silent.update(grid.contexts)
    with pytest.raises(RuntimeError, match="round 1: no peer answered; peer 0: no reply"):
        strategy.run_round(grid, 1)


def test_start_runs_every_round_and_reports():
    cfg = dataclasses.replace(small_config(), rounds=2)
    strategy = strategy_for(cfg)
    result = strategy.start(FakeGrid(client.app, 3))
    report = strategy.report()
    assert [row["round"] for row in report["rounds"]] == [0, 1]
    # Flower's Result: the rows' numbers per round, numbered from 1 as Flower does.
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["accuracy"] == report["final_accuracy"]
    assert report["missing_peers"] == [] and report["peer_nodes"] == {
        "0": 1000,
        "1": 1001,
        "2": 1002,
    }
    assert report["totals"]["total"] == report["rounds"][-1]["cum_bytes"]
    assert report["final_accuracy"] > report["initial_accuracy"]


# ---- nodes with their own data (examples/flower-app) ------------------------------------
EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"


@pytest.fixture
def example(monkeypatch):
    """The example app's package (tallytrain_app), imported from examples/."""
    monkeypatch.syspath_prepend(str(EXAMPLE_APP))
    import tallytrain_app.client_app
    import tallytrain_app.make_data
    import tallytrain_app.task

    return tallytrain_app


def own_data_grid(example, cfg: RunConfig, data_dir: Path, files=None) -> FakeGrid:
    """Three nodes of the example's ClientApp, each with its own data file
    in a directory of its own (as on separate machines) named by its node
    config, and the shared probes named by the run config."""
    example.make_data.write_files(str(data_dir), cfg)
    grid = FakeGrid(example.client_app.app, cfg.peers)
    for i, (_node, ctx) in enumerate(sorted(grid.contexts.items())):
        own = data_dir / f"machine{i}"
        own.mkdir(exist_ok=True)
        (data_dir / f"node{i}.pt").rename(own / "train.pt")
        ctx.node_config["data-file"] = files[i] if files and files[i] else str(own / "train.pt")
        ctx.run_config["app.data-dir"] = str(data_dir)
    return grid


@pytest.mark.parametrize(
    "method, protocol", [("tallytrain", {}), ("bridge", {"merge_period": 1, "topk_fraction": 0.05})]
)
def test_nodes_reading_their_own_files_match_the_simulator(example, tmp_path, method, protocol):
    """Each node holds only its own file's shard and its own model; given the
    simulator's shards and the same model factory, the run is the
    simulator's, round by round."""
    from tallytrain.app.plugins import register_model

    cfg = small_config(method, **protocol)
    grid = own_data_grid(example, cfg, tmp_path)
    shared = example.task.shared({"app.data-dir": str(tmp_path)})
    strategy = TallyTrainStrategy(
        cfg, FlowerOptions(), probes=shared, model=example.task.make_model
    )
    register_model("example-mlp", example.task.make_model, replace=True)
    sim_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, archs=("example-mlp",)))
    sim = Federation(sim_cfg, prepare(cfg.data, cfg.peers, cfg.seed))
    strategy.connect(grid)
    assert strategy.fed.shard_sizes == sim.shard_sizes  # told by the nodes
    app = grid.app
    grid.app = lambda msg, ctx: (client._federation.cache_clear(), app(msg, ctx))[1]
    for r in range(cfg.rounds):
        with torch_threads(1):
            expected = sim.run_round(r)
        row = strategy.run_round(grid, r)
        assert row["missing_peers"] == []
        for key in (
            "bytes_up",
            "bytes_down",
            "accuracy",
            "consensus_acc",
            "agreement",
            "kept_fraction",
            "peer_acc_mean",
            "peer_acc_min",
            "peer_acc_max",
        ):
            assert row[key] == expected[key], key
    # The server holds no peer and no training data.
    assert strategy.fed.population.members == [] and len(strategy.fed.data.y_train) == 0


def test_a_node_saves_only_its_own_peer(example, tmp_path):
    """Bridge keeps [P, M] anchors and residuals in the simulator; a node's
    saved state has its own rows only (and its own model, votes model and
    memory), and its Federation holds its own shard alone."""
    cfg = small_config("bridge", merge_period=2, topk_fraction=0.05)
    grid = own_data_grid(example, cfg, tmp_path)
    strategy = TallyTrainStrategy(
        cfg,
        FlowerOptions(),
        probes=example.task.shared({"app.data-dir": str(tmp_path)}),
        model=example.task.make_model,
    )
    strategy.connect(grid)
    strategy.run_round(grid, 0)  # not a merge round: what was sent waits for nothing
    for node in strategy.peer_nodes.values():
        params, state = records.load_peer_state(grid.contexts[node].state)
        size = sum(v.numel() for v in params.values())
        assert size == strategy.fed.population.single_group.num_params
        assert state["anchor"].shape == (size,) and state["residual"].shape == (size,)
        assert state["sent"] is None
        assert {k: v.shape for k, v in state["voters"].items()} == {
            k: v.shape for k, v in params.items()
        }
        assert state["memory"] is not None
        assert set(state) == {"anchor", "residual", "sent", "voters", "memory"}
    fed, _, _ = client._federation.__wrapped__(
        client.NodeSource(example.task.load_node, example.task.shared),
        records.config_json(cfg),
        1,
        client._items(grid.contexts[1001].node_config),
        client._items(grid.contexts[1001].run_config),
    )
    assert fed.population.members == [1] and fed.method.anchor.shape[0] == 1
    assert len(fed.data.y_train) == strategy.fed.shard_sizes[1]
    assert [len(s) for s in fed.data.shards] == [0, strategy.fed.shard_sizes[1], 0]
    assert fed.data.y_probe.unique().tolist() == [0]  # the probes' labels stay on the server


def test_a_missing_data_file_is_one_clear_line(example, tmp_path):
    cfg = small_config()
    missing = str(tmp_path / "nowhere" / "train.pt")
    grid = own_data_grid(example, cfg, tmp_path, files=[None, None, missing])
    grid.contexts[1000].node_config.pop("data-file")  # falls back to <app.data-dir>/node0.pt
    (tmp_path / "machine0" / "train.pt").rename(tmp_path / "node0.pt")
    strategy = TallyTrainStrategy(
        cfg,
        FlowerOptions(round_timeout=0.5),
        probes=example.task.shared({"app.data-dir": str(tmp_path)}),
    )
    strategy.connect(grid)
    assert sorted(strategy.peer_nodes) == [0, 1]
    row = strategy.run_round(grid, 0)
    assert row["answered_peers"] == [0, 1] and row["missing_peers"] == [2]
    why = row["failures"]["2"]
    assert why == (
        f"its node 1002 cannot serve it: load(node_config) failed on the node of "
        f"peer 2: FileNotFoundError: the node's data file {missing!r} does not exist"
    )
    assert ("train", 1002) not in grid.sent


@pytest.mark.parametrize(
    "loaded, match",
    [
        (lambda cfg: ("mlp",), r"must return \(model, train_data\)"),
        (
            lambda cfg: (42, (torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))),
            "the model must be an nn.Module, a factory",
        ),
        (
            lambda cfg: ("mlp", (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))),
            r"training inputs are \(3,\), the shared probes \(64,\)",
        ),
        (
            lambda cfg: ("mlp", (torch.zeros(4, 64), torch.full((4,), 10))),
            r"labels must lie in 0..9",
        ),
        (lambda cfg: ("mlp", (torch.zeros(4, 64), torch.zeros(4))), "labels must be integers"),
    ],
)
def test_a_bad_load_result_names_what_is_wrong(tmp_path, loaded, match):
    cfg = small_config()
    shared = SharedData(
        (torch.zeros(80, 64), torch.arange(80) % 10), (torch.zeros(20, 64), torch.arange(20) % 10)
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={"partition-id": 0, "num-partitions": 3},
    )
    content = records.hello(records.config_json(cfg), 1)
    answer = client.introduce(content, ctx, client.NodeSource(loaded, shared))
    error = answer.config_records[records.RECORD]["error"]
    assert "\n" not in error
    import re

    assert re.search(match, error), error


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: client.client_app(load=lambda c: None), "needs both load= .* and probes="),
        (lambda: client.client_app(load=3, probes=lambda rc: None), "load= must be a callable"),
        (lambda: SharedData(None, (torch.zeros(2, 3), torch.zeros(2))), "needs both probes="),
        (lambda: SharedData(torch.zeros(2, 3), None, num_classes=1), "needs both probes="),
        (
            lambda: SharedData(
                torch.zeros(5), (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
            ).build(),
            r"probes: inputs must be \[N, ...\]",
        ),
        (
            lambda: SharedData(torch.zeros(5, 4), (torch.zeros(2, 3), torch.arange(2))).build(),
            r"test inputs are \(3,\), probe inputs \(4,\)",
        ),
        (lambda: TallyTrainStrategy(small_config(), probes="shared.pt"), "probes= must be a"),
    ],
)
def test_bad_flower_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_app_keys_belong_to_the_app():
    cfg, _ = parse_run_config({"app.data-dir": "/data", "peers": 4})
    assert cfg.peers == 4
