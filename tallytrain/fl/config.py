"""Run configuration: frozen dataclasses, validated on construction, with a
strict round trip through JSON (``to_dict`` / ``from_dict``) so that a run
directory's config.json fully determines its results."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from ..data.partition import PARTITIONS


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    partition: str = "dirichlet"  # iid | dirichlet | classes | groups
    alpha: float = 0.1  # Dirichlet concentration
    classes_per_peer: int = 2  # for partition="classes"
    min_shard_size: int = 10
    max_retries: int = 100  # Dirichlet redraws before giving up
    test_fraction: float = 0.2  # carved when the dataset has no test split
    probe_fraction: float = 0.2  # the public probe pool
    max_samples: int = 0  # 0 = use every sample
    max_test_samples: int = 0  # 0 = the whole test split
    max_probe_samples: int = 0  # cap on the public probe pool (0 = all of it)
    num_classes: int = 100  # synthetic task and glyphs
    synthetic_dim: int = 32
    samples_per_class: int = 30
    synthetic_noise: float = 0.6
    synthetic_seed: int = 0
    vocab_size: int = 4096  # pytext: BPE vocabulary = classes
    context: int = 64  # pytext: tokens per window
    renders_per_face: int = 3  # glyphs: jittered renders per class and face
    fonts: Tuple[str, ...] = ()  # glyphs: font files (empty = matplotlib's DejaVu)
    cache_dir: Optional[str] = None  # derived data (tokenizers, renders); None = default

    def __post_init__(self):
        object.__setattr__(self, "fonts", tuple(self.fonts))
        _require(
            self.partition in PARTITIONS,
            f"unknown partition {self.partition!r}; known partitions: {', '.join(PARTITIONS)}",
        )
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _require(
            self.classes_per_peer >= 1,
            f"classes_per_peer must be >= 1, got {self.classes_per_peer}",
        )
        _require(
            self.min_shard_size >= 1, f"min_shard_size must be >= 1, got {self.min_shard_size}"
        )
        _require(self.max_retries >= 1, f"max_retries must be >= 1, got {self.max_retries}")
        _require(
            0 < self.probe_fraction < 1,
            f"probe_fraction must be in (0, 1), got {self.probe_fraction}",
        )
        _require(
            0 < self.test_fraction < 1 and self.test_fraction + self.probe_fraction < 1,
            f"test_fraction must be in (0, 1) with test_fraction + probe_fraction < 1, got "
            f"{self.test_fraction} + {self.probe_fraction}",
        )
        _require(self.max_samples >= 0, f"max_samples must be >= 0, got {self.max_samples}")
        _require(
            self.max_test_samples >= 0,
            f"max_test_samples must be >= 0, got {self.max_test_samples}",
        )
        _require(
            self.max_probe_samples >= 0,
            f"--max-probe-samples must be >= 0, got {self.max_probe_samples}",
        )
        _require(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        _require(self.context >= 1, f"--context must be >= 1, got {self.context}")
        _require(
            self.renders_per_face >= 1,
            f"--renders-per-face must be >= 1, got {self.renders_per_face}",
        )


@dataclass(frozen=True)
class ModelConfig:
    archs: Tuple[str, ...] = ("mlp",)  # assigned to peers round-robin
    hidden: int = 64

    def __post_init__(self):
        object.__setattr__(self, "archs", tuple(self.archs))
        _require(len(self.archs) >= 1, "archs must name at least one architecture")
        _require(self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}")

    @property
    def mixed(self) -> bool:
        return len(set(self.archs)) > 1


PEER_ORDERS = ("distill-train", "train-distill", "joint")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 30  # minibatch steps on the shard per round
    batch_size: int = 32
    lr: float = 0.01  # Adam; state reset every round
    distill_steps: int = 30  # steps on the probes (sequential orders only)
    distill_batch_size: int = 64  # the smallest distillation batch
    distill_epochs: float = 20.0  # passes over the distillation pool per round; the
    # batch grows to make them (0 = fixed batch)
    distill_batch_max: int = 1024  # the largest distillation batch
    temperature: float = 2.0  # softlabel / feddf distillation temperature
    undertrained_fraction: float = 0.0  # share of peers doing only undertrained_steps
    undertrained_steps: int = 1
    peer_batch: int = 0  # peers per vectorised training call (0 = all of an arch)
    order: str = "joint"  # distillation methods: see docs/protocol.md
    distill_weight: float = 1.0  # order="joint": weight of the consensus loss

    def __post_init__(self):
        _require(
            self.order in PEER_ORDERS,
            f"order must be one of {', '.join(PEER_ORDERS)}, got {self.order!r}",
        )
        for name in ("local_steps", "distill_steps", "undertrained_steps", "peer_batch"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "distill_batch_size", "distill_batch_max"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(
            self.distill_epochs >= 0, f"distill_epochs must be >= 0, got {self.distill_epochs}"
        )
        _require(
            self.distill_batch_max >= self.distill_batch_size,
            f"distill_batch_max ({self.distill_batch_max}) must be >= distill_batch_size "
            f"({self.distill_batch_size})",
        )
        _require(
            self.distill_weight >= 0, f"distill_weight must be >= 0, got {self.distill_weight}"
        )
        _require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _require(
            0 <= self.undertrained_fraction <= 1,
            f"undertrained_fraction must be in [0, 1], got {self.undertrained_fraction}",
        )


ADVERSARIAL_MODES = ("random", "flip")
VOTERS = ("local", "local-first", "distilled")
PAYLOAD_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ProtocolConfig:
    probes_per_round: int = 256
    participation: float = 1.0  # share of peers selected each round
    agreement_threshold: float = 0.5  # keep probes with count/total >= this
    # ... and whose winner has at least this many votes, a vote counting as its
    # peer's reputation (1 = fully trusted): 0.25 keeps a probe that only
    # near-chance voters decided (docs/results.md section 5.5) out of the consensus
    min_votes: float = 0.25
    # peers abstain when top-1 prob < this (None = never: with the support test it only
    # slowed learning, docs/results.md section 5)
    abstain_below: Optional[float] = None
    support_min: int = 1  # ... or when their own shard holds fewer samples
    # of the predicted class than this (0 = off)
    support_radius: Optional[float] = 0.8  # ... or when the probe is farther from every
    # shard sample of that class than this quantile of
    # the shard's nearest-same-class distances ('none' =
    # off; float inputs only)
    memory_max_age: int = 0  # peers keep consensus labels this many rounds
    # (0 = until replaced or dropped; 1 = no memory)
    votes_from: str = "local-first"  # tallytrain: the model a peer votes with: its
    # local-only model, that one and where it abstains
    # the distilled one (local-first), or the distilled
    softlabel_memory: bool = False  # softlabel: keep past rounds' soft labels too
    # (measured to slow it down; docs/results.md)
    reputation: bool = True  # tally weights from each peer's past agreement
    decentralized: bool = False  # tallytrain: every peer tallies all votes
    prox_mu: float = 0.01  # fedprox
    softlabel_dtype: str = "float32"
    softlabel_topk: int = 16  # softlabel-topk: classes sent per probe position (k)
    sharpen_temperature: Optional[float] = None  # DS-FL entropy reduction (e.g. 0.1)
    server_distill_steps: int = 50  # feddf
    server_lr: float = 1e-3  # feddf: Adam on the server model (as in FedDF)
    param_dtype: str = "float32"  # parameter payloads: dense vectors, sparse values
    merge_period: int = 1  # fedavg/fedprox/feddf: average every this many rounds;
    # bridge: sparse merge every this many (0 = never)
    topk_fraction: float = 0.01  # bridge: share of parameters a peer sends per merge
    adversarial_fraction: float = 0.0
    adversarial_mode: str = "random"  # random | flip

    def __post_init__(self):
        _require(
            self.probes_per_round >= 1,
            f"probes_per_round must be >= 1, got {self.probes_per_round}",
        )
        _require(
            0 < self.participation <= 1,
            f"participation must be in (0, 1], got {self.participation}",
        )
        _require(self.min_votes > 0, f"min_votes must be > 0, got {self.min_votes}")
        _require(self.support_min >= 0, f"support_min must be >= 0, got {self.support_min}")
        _require(
            self.support_radius is None or 0 < self.support_radius <= 1,
            f"support_radius must be in (0, 1], got {self.support_radius}",
        )
        _require(
            self.votes_from in VOTERS,
            f"votes_from must be one of {', '.join(VOTERS)}, got {self.votes_from!r}",
        )
        _require(
            self.memory_max_age >= 0, f"memory_max_age must be >= 0, got {self.memory_max_age}"
        )
        _require(
            0 <= self.agreement_threshold <= 1,
            f"agreement_threshold must be in [0, 1], got {self.agreement_threshold}",
        )
        _require(
            self.abstain_below is None or 0 <= self.abstain_below <= 1,
            f"abstain_below must be in [0, 1], got {self.abstain_below}",
        )
        _require(
            not (self.decentralized and self.participation < 1),
            "decentralized mode needs participation = 1 (every peer hears every peer)",
        )
        _require(self.prox_mu >= 0, f"prox_mu must be >= 0, got {self.prox_mu}")
        _require(
            self.softlabel_topk >= 1, f"--softlabel-topk must be >= 1, got {self.softlabel_topk}"
        )
        for name in ("softlabel_dtype", "param_dtype"):
            _require(
                getattr(self, name) in PAYLOAD_DTYPES,
                f"{name} must be one of {', '.join(PAYLOAD_DTYPES)}, got {getattr(self, name)!r}",
            )
        _require(
            self.sharpen_temperature is None or self.sharpen_temperature > 0,
            f"sharpen_temperature must be > 0, got {self.sharpen_temperature}",
        )
        _require(self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")
        _require(
            self.server_distill_steps >= 0,
            f"server_distill_steps must be >= 0, got {self.server_distill_steps}",
        )
        _require(
            isinstance(self.merge_period, int)
            and not isinstance(self.merge_period, bool)
            and self.merge_period >= 0,
            f"merge_period must be an integer >= 0, got {self.merge_period!r}",
        )
        _require(
            0 < self.topk_fraction <= 1,
            f"topk_fraction must be in (0, 1], got {self.topk_fraction}",
        )
        _require(
            0 <= self.adversarial_fraction <= 1,
            f"adversarial_fraction must be in [0, 1], got {self.adversarial_fraction}",
        )
        _require(
            self.adversarial_mode in ADVERSARIAL_MODES,
            f"adversarial_mode must be one of {', '.join(ADVERSARIAL_MODES)}, got "
            f"{self.adversarial_mode!r}",
        )


@dataclass(frozen=True)
class RunConfig:
    """One federated run: one method, one seed."""

    method: str = "tallytrain"
    seed: int = 0
    peers: int = 10
    rounds: int = 20
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __post_init__(self):
        _require(self.peers >= 1, f"peers must be >= 1, got {self.peers}")
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        return from_dict(cls, d)


_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=-+")


@dataclass(frozen=True)
class CompareConfig:
    """Several methods and seeds on identical splits, partitions and probes.

    ``methods`` are the labels of the compared runs. A label is a method name,
    or a key of ``settings`` that names a method and overrides some of its
    protocol and train fields, so that one method can appear at several
    operating points (``{"fedavg-R5": {"method": "fedavg", "protocol":
    {"merge_period": 5}}}``) or with one mechanism off (``tallytrain ablate``).
    """

    methods: Tuple[str, ...] = ("tallytrain",)
    seeds: Tuple[int, ...] = (0,)
    base: RunConfig = field(default_factory=RunConfig)
    settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        _require(len(self.methods) >= 1, "methods must name at least one method")
        _require(
            len(set(self.methods)) == len(self.methods),
            f"methods lists a method twice: {', '.join(self.methods)}",
        )
        _require(len(self.seeds) >= 1, "seeds must hold at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), f"seeds repeat: {self.seeds}")
        _require(isinstance(self.settings, dict), "settings must be a mapping label -> setting")
        object.__setattr__(self, "settings", copy.deepcopy(self.settings))
        for label in self.methods:
            # Labels name directories of the run directory.
            _require(
                bool(label) and set(label) <= _LABEL_CHARS and set(label) != {"."},
                f"label {label!r} must use letters, digits and . _ = - + (not only dots)",
            )
        for label, setting in self.settings.items():
            _require(label in self.methods, f"settings has {label!r}, which methods does not list")
            _require(
                isinstance(setting, dict)
                and set(setting) <= {"method", "protocol", "train"}
                and isinstance(setting.get("method"), str)
                and all(isinstance(setting.get(k, {}), dict) for k in ("protocol", "train")),
                f"settings[{label!r}] must be {{'method': name, 'protocol': {{field: "
                f"value}}, 'train': {{field: value}}}}, got {setting!r}",
            )
            for section, cls in (("protocol", ProtocolConfig), ("train", TrainConfig)):
                unknown = set(setting.get(section, {})) - {f.name for f in fields(cls)}
                _require(
                    not unknown,
                    f"settings[{label!r}] overrides unknown {section} fields: "
                    f"{', '.join(sorted(unknown))}",
                )
            self.run(label, self.seeds[0])  # validates the overridden values

    def method_of(self, label: str) -> str:
        return self.settings[label]["method"] if label in self.settings else label

    def run(self, label: str, seed: int) -> RunConfig:
        setting = self.settings.get(label, {})
        protocol = dataclasses.replace(self.base.protocol, **setting.get("protocol", {}))
        train = dataclasses.replace(self.base.train, **setting.get("train", {}))
        return dataclasses.replace(
            self.base, method=self.method_of(label), seed=seed, protocol=protocol, train=train
        )

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CompareConfig":
        return from_dict(cls, d)


def to_dict(cfg) -> Dict[str, Any]:
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = copy.deepcopy(value)
        out[f.name] = value
    return out


def from_dict(cls, d: Dict[str, Any], where: str = "config"):
    """Build ``cls`` from a dict, refusing unknown or missing keys by name."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(unknown)}")
    missing = sorted(set(known) - set(d))
    if missing:
        raise ValueError(f"{where} lacks keys: {', '.join(missing)}")
    kwargs = {}
    for name in known:
        value = d[name]
        sub = _NESTED.get((cls.__name__, name))
        kwargs[name] = from_dict(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_NESTED = {
    ("RunConfig", "data"): DataConfig,
    ("RunConfig", "model"): ModelConfig,
    ("RunConfig", "train"): TrainConfig,
    ("RunConfig", "protocol"): ProtocolConfig,
    ("CompareConfig", "base"): RunConfig,
}


def config_diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> list:
    """Dotted names of the fields where two config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out
