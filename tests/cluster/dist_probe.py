"""One process of a distributed launch: report where it sits and prove the group works.

Started by the ``slurm`` tests inside SLURM jobs, either by ``torchrun --standalone`` (one
task, several GPUs) or by ``srun`` (one task per GPU, the several-nodes path). Reads its rank
with mofo's own :func:`mofo.training.distributed.rank_info` (torchrun's variables first, then
SLURM's), joins a gloo process group, all-reduces ``rank + 1`` and writes
``<out_dir>/rank<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mofo.training.distributed import export_rank_env, rank_info


def main(out_dir: str) -> None:
    info = rank_info()
    export_rank_env(info)
    dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    value = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()
    record = {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "source": info.source,
        "all_reduce_sum": value.item(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "master_addr": os.environ.get("MASTER_ADDR"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
