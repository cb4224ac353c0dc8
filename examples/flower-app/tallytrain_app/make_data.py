"""Write the example's data files from the bundled digits dataset:
``python -m tallytrain_app.make_data DIR [--peers 3] [--seed 0] [--alpha 0.1]``.

``DIR/node<i>.pt`` is peer i's shard (copy it to node i's machine alone),
``DIR/shared.pt`` the probe pool and test set (every machine). The split is
the one ``tallytrain run`` makes for the same dataset, partition and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from tallytrain.data import prepare
from tallytrain.fl.config import RunConfig


def write_files(out_dir: str, cfg: RunConfig) -> None:
    """One file per peer and the shared file, for ``cfg``'s data and seed."""
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    for i, shard in enumerate(data.shards):
        index = torch.from_numpy(shard).long()
        torch.save(
            {"x": data.x_train[index].clone(), "y": data.y_train[index].clone()},
            os.path.join(out_dir, f"node{i}.pt"),
        )
    torch.save(
        {
            "x_probe": data.x_probe,
            "y_probe": data.y_probe,
            "x_test": data.x_test,
            "y_test": data.y_test,
        },
        os.path.join(out_dir, "shared.pt"),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args(argv)
    cfg = RunConfig(peers=args.peers, seed=args.seed)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dataset=args.dataset, alpha=args.alpha)
    )
    write_files(args.out_dir, cfg)
    print(f"wrote {args.peers} node files and shared.pt to {args.out_dir}")


if __name__ == "__main__":
    main()
