"""One process of the DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT SHARPNESS [section.key=value ...]`."""

import sys

from drafter.config import load_config
from drafter.train import train
from tests.conftest import ROOT
from tests.tiny_data import collate, make_dataset, sharp_target

if __name__ == "__main__":
    out, sharpness, *sets = sys.argv[1:]
    target = sharp_target(sharpness=float(sharpness))
    data = make_dataset(target, 48, seed=1), make_dataset(target, 8, seed=2)
    base = ["drafter.block_size=4", "train.batch_size=4", "train.lr=3e-3", "train.system_metrics=false"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", base + sets)
    train(cfg, out_dir=out, target=target, data=data, collate=collate)
