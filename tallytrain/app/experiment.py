"""Experiments on disk: ``run_compare`` runs several methods and seeds on
identical splits, partitions and probes and keeps everything in one run
directory; ``--resume`` picks an interrupted directory up where it stopped.

Layout of a run directory::

    config.json              the CompareConfig (all of it)
    partition.json           per seed: split indices, each peer's samples, class counts
    metrics.jsonl            one row per label, seed and round
    comm.csv                 one row per message: label, seed, round, sender, ...
    summary.json             {"methods": {label: {...}}}
    accuracy_vs_round.png, accuracy_vs_bytes.png, partition_heatmap.png
    runs/<label>/seed<s>/    checkpoint.pt (after every round), metrics.jsonl,
                             and, once finished, comm.csv and result.json

A label is a method's name, or an operating point of one (CompareConfig's
``settings``, e.g. ``fedavg-R5``); metrics rows carry both ``method`` and
``label``, and comm.csv's ``method`` column holds the label.

Nothing existing is overwritten unless ``overwrite`` (which replaces a
previous run directory, and only a run directory) or ``resume`` (which checks
that the stored config equals the requested one and continues it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import report
from ..data import FederatedData, load_dataset, prepare
from ..fl.config import CompareConfig, RunConfig, config_diff
from ..fl.loop import Federation, load_checkpoint, save_checkpoint, validate
from ..fl.registry import get_method
from . import plugins
from .progress import Progress

CONFIG_FILE, PARTITION_FILE, METRICS_FILE = "config.json", "partition.json", "metrics.jsonl"
COMM_FILE, SUMMARY_FILE = "comm.csv", "summary.json"
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "partition_heatmap.png")


def option_fields() -> Dict[str, Tuple[Optional[str], dataclasses.Field]]:
    """Every configurable field by its (unique) name: ``(section, field)``,
    the section being the RunConfig field holding it (``"data"``,
    ``"train"``, ...) or None for RunConfig's own (``peers``, ``rounds``).
    ``method`` and ``seed`` are set per run, not options."""
    out: Dict[str, Tuple[Optional[str], dataclasses.Field]] = {}
    for top in dataclasses.fields(RunConfig):
        if top.name in ("method", "seed"):
            continue
        default = (
            top.default_factory() if top.default_factory is not dataclasses.MISSING else top.default
        )
        for section, f in (
            [(top.name, f) for f in dataclasses.fields(default)]
            if dataclasses.is_dataclass(default)
            else [(None, top)]
        ):
            if f.name in out:
                raise RuntimeError(
                    f"config field {f.name!r} appears twice; options are "
                    f"named by field, so names must be unique"
                )
            out[f.name] = (section, f)
    return out


def compare_config(methods: Sequence[str], seeds: Sequence[int], **options: Any) -> CompareConfig:
    """A CompareConfig from flat options named like the config fields
    (``peers=5, alpha=0.3, local_steps=10``), as ``tallytrain compare`` takes
    them; unnamed fields keep their defaults."""
    known = option_fields()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)}; options are the fields of "
            f"the run configuration (tallytrain/fl/config.py)"
        )
    sections: Dict[str, Dict[str, Any]] = {}
    top: Dict[str, Any] = {}
    for name, value in options.items():
        section = known[name][0]
        (top if section is None else sections.setdefault(section, {}))[name] = value
    defaults = RunConfig()
    built = {
        section: dataclasses.replace(getattr(defaults, section), **values)
        for section, values in sections.items()
    }
    methods, seeds = tuple(methods), tuple(seeds)
    if not methods:
        raise ValueError("methods must name at least one method")
    base = dataclasses.replace(
        defaults, method=methods[0], seed=seeds[0] if seeds else 0, **top, **built
    )
    settings = {}
    if BYTE_MATCHED in methods:
        settings[BYTE_MATCHED] = byte_matched_softlabel(base)
    return CompareConfig(methods=methods, seeds=seeds, base=base, settings=settings)


#: The label of softlabel restricted to about tallytrain's uplink bytes.
BYTE_MATCHED = "softlabel-matched"


def byte_matched_softlabel(base: RunConfig) -> Dict[str, Any]:
    """softlabel at about tallytrain's uplink bytes: float16 soft labels on as
    many probes per round as fit in one tallytrain VOTES message (at least
    one). The sizes are those of the real messages (wire.*_message_bytes);
    the ledger then counts what the runs actually send."""
    from .. import wire

    num_classes = load_dataset(base.data).num_classes
    votes = wire.votes_message_bytes(base.protocol.probes_per_round, num_classes, abstain=True)
    per_probe = wire.soft_labels_message_bytes(1, num_classes, torch.float16) - wire.OVERHEAD
    probes = max(1, round((votes - wire.OVERHEAD) / per_probe))
    return {
        "method": "softlabel",
        "protocol": {"softlabel_dtype": "float16", "probes_per_round": probes},
    }


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, mismatched, corrupt)."""


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{what} {path} is corrupt or unreadable ({exc})") from exc


def _check_dir(cfg: CompareConfig, out: str, resume: bool, overwrite: bool) -> None:
    """Refuse (RunDirError) a run directory that cannot be used as asked,
    writing nothing; :func:`_make_dir` then creates or clears it."""
    if resume and overwrite:
        raise ValueError("pass either resume or overwrite, not both")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirError(f"run directory {out} is a file")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the first existing folder above it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"cannot create run directory {out}: {parent} is a file")
    cfg_path = os.path.join(out, CONFIG_FILE)
    if resume:
        if not os.path.isfile(cfg_path):
            raise RunDirError(
                f"cannot resume: run directory {out} holds no {CONFIG_FILE} (is it a run "
                "directory?)"
            )
        stored = _read_json(cfg_path, "run config")
        try:
            stored_cfg = CompareConfig.from_dict(stored)
        except (ValueError, TypeError) as exc:
            raise RunDirError(f"cannot resume: {cfg_path} is not a valid config ({exc})") from exc
        diff = config_diff(stored_cfg.to_dict(), cfg.to_dict())
        if diff:
            raise RunDirError(
                f"cannot resume run directory {out}: it was started with another "
                "configuration (" + "; ".join(diff) + "); rerun with the same options, or use "
                "another --out"
            )
        return
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise RunDirError(
                f"run directory {out} already exists and is not empty; pass "
                f"--resume to continue it or --overwrite to replace it"
            )
        if not os.path.isfile(cfg_path):
            raise RunDirError(
                f"refusing to overwrite run directory {out}: it holds no "
                f"{CONFIG_FILE}, so it does not look like a tallytrain run directory"
            )


def _make_dir(cfg: CompareConfig, out: str, resume: bool, overwrite: bool) -> None:
    if resume:
        return
    if overwrite and os.path.isdir(out) and os.listdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    report.write_json_atomic(os.path.join(out, CONFIG_FILE), cfg.to_dict())


def _run_one(
    cfg: RunConfig,
    data: FederatedData,
    run_dir: str,
    resume: bool,
    progress: Union[Progress, _QueueProgress],
    name: str,
) -> dict:
    """One run; ``name`` is its label in the comparison (the method's name,
    or the operating point's label)."""
    result_path = os.path.join(run_dir, "result.json")
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    label = f"{name} seed {cfg.seed}"
    if resume and os.path.isfile(result_path):
        result = _read_json(result_path, "run result")
        if not isinstance(result, dict) or config_diff(result.get("config", {}), cfg.to_dict()):
            raise RunDirError(f"{result_path} belongs to another configuration")
        progress.advance(label + " (done earlier)", cfg.rounds, run_finished=True, skipped=True)
        return result
    os.makedirs(run_dir, exist_ok=True)
    for entry in os.listdir(run_dir):  # temporaries of a run killed mid-write
        if ".tmp." in entry:
            os.remove(os.path.join(run_dir, entry))
    fed = Federation(cfg, data)
    if resume and os.path.isfile(ckpt):
        try:
            load_checkpoint(fed, ckpt)
        except ValueError as exc:
            raise RunDirError(f"cannot resume: {exc}; delete {ckpt} to restart that run") from exc
        progress.advance(label + f" (resumed at round {fed.round})", fed.round, skipped=True)

    def on_round(f: Federation) -> None:
        save_checkpoint(f, ckpt)
        with f.timer("checkpoint"):
            report.write_text_atomic(
                os.path.join(run_dir, METRICS_FILE), report.metrics_jsonl(f.metrics)
            )
        progress.advance(
            f"{label} round {f.round}/{cfg.rounds}", run_finished=f.round == cfg.rounds
        )

    fed.run(on_round)
    report.write_text_atomic(
        os.path.join(run_dir, COMM_FILE), fed.ledger.to_csv({"method": name, "seed": cfg.seed})
    )
    result = {
        "config": cfg.to_dict(),
        "final_accuracy": fed.metrics[-1]["accuracy"],
        "totals": fed.ledger.totals(),
        "phase_seconds": dict(fed.timer.seconds),
        "adversarial_peers": np.flatnonzero(fed.adversarial).tolist(),
        "undertrained_peers": np.flatnonzero(fed.undertrained).tolist(),
    }
    if "perplexity" in fed.metrics[-1]:  # sequence tasks
        result["final_perplexity"] = fed.metrics[-1]["perplexity"]
    report.write_json_atomic(result_path, result)
    return result


def run_compare(
    cfg: CompareConfig,
    out: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    threads: int = 1,
    jobs: int = 1,
) -> dict:
    """Run every (label, seed) of ``cfg`` into ``out``; returns summary.json's dict.

    threads: torch CPU threads per run (restored afterwards). The default 1
    is the fastest for these small models and keeps results independent of
    the machine; on a shared 2-core machine two threads were measured up to
    70x slower (OpenMP workers spinning against other work).
    jobs: runs in parallel worker processes (each with ``threads`` threads).
    Every run derives all its randomness from its own config, so the results
    do not depend on ``jobs``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_compare(cfg, out, resume, overwrite, show_progress, threads, jobs)
    finally:
        torch.set_num_threads(before)


def data_fingerprint(dataset) -> str:
    """A hash of every tensor of ``dataset`` (inputs and labels of each
    split): partition.json keeps it, so that resuming on data that changed
    since the run began (other files in --data-dir, other own data) is
    refused instead of mixing two datasets' results. About 1 s per GB."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("x", "y", "x_test", "y_test", "x_probe", "y_probe"):
        t = getattr(dataset, name, None)
        h.update(name.encode())
        if t is not None:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().contiguous().numpy().view(np.uint8).data)
    return h.hexdigest()


def run_dir_of(out: str, label: str, seed: int) -> str:
    return os.path.join(out, "runs", label, f"seed{seed}")


def _run_compare(
    cfg: CompareConfig,
    out: str,
    resume: bool,
    overwrite: bool,
    show_progress: bool,
    threads: int,
    jobs: int,
) -> dict:
    for label in cfg.methods:
        get_method(cfg.method_of(label))  # unknown names fail before anything is read
    # Workers need the plugins and own datasets and models too: refuse what
    # cannot travel to them now, before anything is read or written.
    own = plugins.portable([cfg.base.data.dataset], cfg.base.model.archs) if jobs > 1 else None
    _check_dir(cfg, out, resume, overwrite)
    # Split and partition every seed, and check every run's configuration
    # against its data (without building a federation), before touching the
    # disk, so that bad input (too many peers, a probe set too large, mixed
    # architectures for a parameter method, ...) fails with nothing written.
    # Each seed is prepared once: with jobs = 1 its split is kept for its runs
    # (memory: one split per seed, at most the dataset's size each); worker
    # processes prepare the seeds they run themselves.
    dataset = load_dataset(cfg.base.data)
    fingerprint = data_fingerprint(dataset)
    partitions, splits = {}, {}
    for seed in cfg.seeds:
        data = prepare(cfg.base.data, cfg.base.peers, seed, dataset)
        partitions[str(seed)] = data.describe()
        for label in cfg.methods:
            validate(cfg.run(label, seed), data)
        if jobs == 1:
            splits[seed] = data
        del data
    del dataset
    partition_path = os.path.join(out, PARTITION_FILE)
    partition = {"data_fingerprint": fingerprint, "seeds": partitions}
    if resume and os.path.isfile(partition_path):
        stored = _read_json(partition_path, "partition")
        expected = dict(partition)
        if "data_fingerprint" not in stored:  # written before fingerprints were kept
            del expected["data_fingerprint"]
        if stored != expected:
            raise RunDirError(
                f"cannot resume run directory {out}: its data changed since the run "
                f"began (the dataset, split or partition in {partition_path} "
                f"differs); use another --out"
            )
    _make_dir(cfg, out, resume, overwrite)
    if not (resume and os.path.isfile(partition_path)):
        report.write_json_atomic(partition_path, partition)
    progress = Progress(len(cfg.methods) * len(cfg.seeds) * cfg.base.rounds, show_progress)
    try:
        if jobs == 1:
            for seed in cfg.seeds:
                data = splits.pop(seed)
                for label in cfg.methods:
                    _run_one(
                        cfg.run(label, seed),
                        data,
                        run_dir_of(out, label, seed),
                        resume,
                        progress,
                        label,
                    )
                del data
        else:
            _run_parallel(cfg, out, resume, progress, threads, jobs, own)
    finally:
        progress.close()
    return finish(cfg, out, np.array(partitions[str(cfg.seeds[0])]["class_counts"]))


class _QueueProgress:
    """A worker's stand-in for :class:`Progress`: forwards every advance to
    the parent, which draws the one progress bar."""

    def __init__(self, queue):
        self.queue = queue

    def advance(
        self, label: str, n: int = 1, run_finished: bool = False, skipped: bool = False
    ) -> None:
        self.queue.put(("progress", (label, n, run_finished, skipped)))


def _die_with_parent() -> None:
    """Ask the kernel to end this worker when the parent process dies (Linux).
    A parent killed outright (SIGTERM, SIGKILL, out of memory) cannot stop its
    workers, and an orphaned worker would go on writing run directories that a
    later ``--resume`` also writes. Elsewhere the parent's own cleanup is all."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    import signal

    spawner = multiprocessing.parent_process()
    parent = spawner.pid if spawner is not None else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker(tasks, updates, threads: int, own: Optional[bytes]) -> None:
    """A worker process: runs tasks until the None sentinel; reports progress,
    each finished run, and the first error (after which it stops). ``own``:
    the parent's plugins and own datasets and models (plugins.portable)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    torch.set_num_threads(threads)
    splits: Dict[tuple, FederatedData] = {}  # a worker keeps the split it made last
    progress = _QueueProgress(updates)
    name = "worker setup"
    try:
        plugins.restore(own)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        updates.put(("error", (name, RuntimeError(f"{type(exc).__name__}: {exc}"))))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        cfg_dict, name, run_dir, resume = task
        try:
            cfg = RunConfig.from_dict(cfg_dict)
            key = (json.dumps(cfg_dict["data"], sort_keys=True), cfg.peers, cfg.seed)
            if key not in splits:
                splits = {key: prepare(cfg.data, cfg.peers, cfg.seed)}
            _run_one(cfg, splits[key], run_dir, resume, progress, name)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            try:
                pickle.dumps(exc)
            except Exception:  # an exception that cannot travel is described instead
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            updates.put(("error", (name, exc)))
            return
        updates.put(("done", name))


def _run_parallel(
    cfg: CompareConfig,
    out: str,
    resume: bool,
    progress: Progress,
    threads: int,
    jobs: int,
    own: Optional[bytes],
) -> None:
    """The runs in ``jobs`` spawned processes (not forked: a fork of a process
    whose OpenMP threads exist can deadlock). The first error in any worker,
    a worker that dies, or Ctrl-C in the parent stops every worker at once;
    checkpoints and run files are written atomically, so ``--resume``
    continues from the last finished round of each run."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    tasks, updates = ctx.Queue(), ctx.Queue()
    runs = [(label, seed) for seed in cfg.seeds for label in cfg.methods]
    for label, seed in runs:
        tasks.put((cfg.run(label, seed).to_dict(), label, run_dir_of(out, label, seed), resume))
    workers = [
        ctx.Process(target=_worker, args=(tasks, updates, threads, own), daemon=True)
        for _ in range(min(jobs, len(runs)))
    ]
    for _ in workers:
        tasks.put(None)
    for w in workers:
        w.start()
    finished = 0
    try:
        while finished < len(runs):
            try:
                kind, payload = updates.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a worker process died (exit code {dead[0].exitcode}); "
                        f"rerun with --resume to continue"
                    ) from None
                continue
            if kind == "progress":
                progress.advance(*payload)
            elif kind == "done":
                finished += 1
            else:
                name, exc = payload
                raise exc
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(timeout=10)
        # Tasks left unread after an error must not keep this process from exiting.
        tasks.cancel_join_thread()
        tasks.close()
        updates.close()


def finish(cfg: CompareConfig, out: str, class_counts: np.ndarray) -> dict:
    """Gather the finished runs into metrics.jsonl, comm.csv, summary.json and plots."""
    rows: List[dict] = []
    comm: List[str] = []
    results: Dict[str, List[dict]] = {}
    for label in cfg.methods:
        for seed in cfg.seeds:
            run_dir = run_dir_of(out, label, seed)
            rows += [
                dict(row, label=label)
                for row in report.read_jsonl(os.path.join(run_dir, METRICS_FILE))
            ]
            with open(os.path.join(run_dir, COMM_FILE), encoding="utf-8") as f:
                text = f.read()
            comm.append(text if not comm else text.split("\n", 1)[1])
            results.setdefault(label, []).append(
                _read_json(os.path.join(run_dir, "result.json"), "run result")
            )
    report.write_text_atomic(os.path.join(out, METRICS_FILE), report.metrics_jsonl(rows))
    report.write_text_atomic(os.path.join(out, COMM_FILE), "".join(comm))
    summary = report.summarize(results)
    report.write_json_atomic(os.path.join(out, SUMMARY_FILE), summary)
    d = cfg.base.data
    part = (
        f"{d.partition}"
        + (f" alpha={d.alpha}" if d.partition == "dirichlet" else "")
        + (f" k={d.classes_per_peer}" if d.partition == "classes" else "")
    )
    title = f"{d.dataset}, {cfg.base.peers} peers, {part}, {len(cfg.seeds)} seed(s)"
    report.plot_accuracy_vs_round(rows, os.path.join(out, PLOTS[0]), title)
    report.plot_accuracy_vs_bytes(rows, os.path.join(out, PLOTS[1]), title)
    if rows and all("perplexity" in r for r in rows):  # sequence tasks
        report.plot_accuracy_vs_bytes(
            rows,
            os.path.join(out, "perplexity_vs_bytes.png"),
            title,
            key="perplexity",
            ylabel="test perplexity (mean over seeds; lower is better)",
        )
    report.plot_partition(
        class_counts,
        os.path.join(out, PLOTS[2]),
        f"samples per peer and class (seed {cfg.seeds[0]})",
    )
    return summary
