"""finetune.selection: the MOFO code's best-validation-epoch protocol (mofo/training/selection.py).

The rule as a pure function; the validation numbers on hand-made logits; the engine's
epoch_end hook with scripted validation numbers (early stop, the best epoch's weights in
checkpoint.pt, resume after interruptions keeps the best so far); one real fine-tuning and
evaluation on the tiny frame store; the provenance of the new keys.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import load_config
from mofo.provenance import stage_hash
from mofo.runtime.distributed import DistContext, RankInfo
from mofo.training import engine
from mofo.training.selection import (
    BestEpochSelection,
    SelectionState,
    update_selection,
    validation_metrics,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CTX = DistContext(RankInfo(0, 0, 1, "single"), torch.device("cpu"), None, "torch")
ENGINE = load_config()["engine"]  # the defaults: resume on, precision auto
MODEL_CFG = {"size": "demo", "input_size": 16, "num_frames": 4, "sampling_rate": 2,
             "patch_size": 8, "tubelet_size": 2}


def run_rule(losses, top1s, patience):
    """Feed a sequence through update_selection until it says stop: (state, stop epoch)."""
    state = SelectionState()
    for epoch, (loss, top1) in enumerate(zip(losses, top1s, strict=True)):
        state, _, stop = update_selection(state, epoch, loss, top1, patience)
        if stop:
            return state, epoch
    return state, None


# --------------------------------------------------------------------------- the rule
def test_patience_counts_epochs_in_a_row_above_the_lowest_loss():
    losses = [1.0, 0.9, 0.95, 0.9, 0.92, 0.93, 0.94, 0.5]
    top1s = [10.0] * len(losses)
    # epoch 3 equals the lowest loss: an improvement (the MOFO code counts only loss > best)
    state, stopped = run_rule(losses, top1s, patience=3)
    assert stopped == 6 and state.bad_epochs == 3 and state.min_loss == 0.9
    assert run_rule(losses, top1s, patience=4)[1] is None
    assert run_rule(losses, top1s, patience=1)[1] == 2
    assert run_rule(losses, top1s, patience=0)[1] is None  # 0 = never stop early
    state, stopped = run_rule([1.0, math.nan, math.nan], [1.0] * 3, patience=2)
    assert stopped == 2 and state.min_loss == 1.0  # a NaN loss is no improvement


def test_best_top1_is_strictly_higher_and_the_first_epoch_counts():
    state, _ = run_rule([1.0, 2.0, 3.0, 4.0], [0.0, 30.0, 30.0, 20.0], patience=0)
    assert (state.best_epoch, state.best_top1, state.best_loss) == (1, 30.0, 2.0)
    assert state.epochs_run == 4
    state, _ = run_rule([1.0, 0.5], [0.0, 0.0], patience=0)
    assert state.best_epoch == 0  # a run that never rises above 0 % still keeps weights


# --------------------------------------------------------------------------- validation
class FixedLogits(torch.nn.Module):
    """Returns the logits stored in the batch's frames (one row per clip), per head."""

    def __init__(self, sizes: dict[str, int]):
        super().__init__()
        self.sizes = sizes
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, frames, inbox):
        out, start = {}, 0
        for name, size in self.sizes.items():
            out[name] = frames[:, start:start + size] + self.weight
            start += size
        return out if len(out) > 1 else out[next(iter(out))]


def test_validation_loss_and_top1_over_heads_skip_unlabelled_clips():
    torch.manual_seed(0)
    verb, noun = torch.randn(5, 3), torch.randn(5, 4)
    verb_y = torch.tensor([0, 1, 2, -1, 1])
    noun_y = torch.tensor([3, 0, 1, 2, -1])
    verb[0, 0], noun[0, 3] = 9.0, 9.0  # clip 0: both right
    verb[1, 1], noun[1, 1] = 9.0, 9.0  # clip 1: verb right, noun wrong
    verb[2, 0], noun[2, 1] = 9.0, 9.0  # clip 2: verb wrong, noun right
    verb[4, 0] = 9.0  # clip 4 (no noun label): verb wrong
    batch = {"frames": torch.cat([verb, noun], 1), "inbox": torch.zeros(5, 2),
             "verb": verb_y, "noun": noun_y}
    model = FixedLogits({"verb": 3, "noun": 4}).train()
    rng = torch.get_rng_state()
    got = validation_metrics(model, [batch], ["verb", "noun"], CTX, ENGINE)
    keep = slice(0, 3)  # clips 3 and 4 miss a label
    loss = (F.cross_entropy(verb[keep], verb_y[keep], reduction="sum")
            + F.cross_entropy(noun[keep], noun_y[keep], reduction="sum")) / 3
    assert got["val_loss"] == pytest.approx(float(loss))
    assert got["val_top1"] == pytest.approx(100 / 3) and got["val_clips"] == 3
    assert got["val_verb_top1"] == pytest.approx(200 / 3)
    assert got["val_noun_top1"] == pytest.approx(200 / 3)
    assert model.training and torch.equal(torch.get_rng_state(), rng)

    one = validation_metrics(FixedLogits({"label": 3}), [{**batch, "label": verb_y}],
                             ["label"], CTX, ENGINE)
    assert one["val_top1"] == pytest.approx(50.0) and set(one) == {"val_loss", "val_top1",
                                                                   "val_clips"}
    with pytest.raises(ValueError, match="no labelled clip"):
        validation_metrics(FixedLogits({"label": 3}),
                           [{**batch, "label": torch.full((5,), -1)}], ["label"], CTX, ENGINE)


def test_action_head_pairs_outside_the_vocabulary_count_as_wrong():
    actions = [(0, 1), (2, 3)]  # action 0 = verb 0 noun 1, action 1 = verb 2 noun 3
    lookup = torch.full((97, 300), -1, dtype=torch.int64)
    for i, (v, n) in enumerate(actions):
        lookup[v, n] = i
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    batch = {"frames": logits, "inbox": torch.zeros(3, 2),
             "verb": torch.tensor([0, 0, 5]), "noun": torch.tensor([1, 1, 5])}
    got = validation_metrics(FixedLogits({"action": 2}), [batch], ["action"], CTX, ENGINE, lookup)
    assert got["val_clips"] == 3 and got["val_top1"] == pytest.approx(100 / 3)
    expected = F.cross_entropy(logits[:2], torch.tensor([0, 0]))  # the unseen pair: no loss
    assert got["val_loss"] == pytest.approx(float(expected))
    unseen = {k: v[2:] for k, v in batch.items()}
    with pytest.raises(ValueError, match="outside the action vocabulary"):
        validation_metrics(FixedLogits({"action": 2}), [unseen], ["action"], CTX, ENGINE, lookup)


# --------------------------------------------------------------------------- the engine hook
# Scripted validation numbers by epoch: the best top-1 is epoch 1; the loss rises after
# epoch 1, so with patience 2 training stops after epoch 3 (4 of 6 epochs).
LOSSES = [1.0, 0.8, 0.9, 0.95, 0.7, 0.6]
TOP1S = [10.0, 30.0, 20.0, 25.0, 90.0, 95.0]
STEPS_PER_EPOCH = 4


def scripted_run(out, snapshots=None, max_steps=None, patience=2):
    """A tiny classifier on synthetic clips, 6 epochs of 4 steps, with the best-epoch hook on
    the scripted numbers; ``snapshots`` collects the weights at every validation."""
    ft = dict(load_config()["finetune"], epochs=len(LOSSES), warmup_epochs=0.5, batch_size=4,
              accum_steps=1, total_batch=4, base_lr=1e-2, log_interval=1, seed=0)
    torch.manual_seed(0)
    from mofo.models.build import build_classifier
    from mofo.training.finetune import finetune_task

    model = build_classifier(MODEL_CFG, 4, pooling="mean", depth=1)
    loader = DataLoader(SyntheticClipDataset(16, MODEL_CFG), batch_size=4, shuffle=True,
                        drop_last=True, generator=torch.Generator())

    def measure(module, epoch):
        if snapshots is not None:
            snapshots[epoch] = {k: v.clone() for k, v in module.state_dict().items()}
        return {"val_loss": LOSSES[epoch], "val_top1": TOP1S[epoch]}

    hook = BestEpochSelection(measure, CTX, patience, "validation")
    return engine.train(model, loader, finetune_task({"label": 4}, None, 0.0), stage_cfg=ft,
                        engine_cfg=ENGINE, ctx=CTX, out_dir=out, hash_config={"ft": ft},
                        max_steps=max_steps, epoch_end=hook)


def records(out, kind):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def same(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_best_selection_stops_early_and_keeps_the_best_epoch(tmp_path):
    snaps = {}
    result = scripted_run(tmp_path / "full", snaps)
    assert result.status == "finished" and result.epoch == 4
    assert result.global_step == 4 * STEPS_PER_EPOCH
    saved = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert sorted(snaps) == [0, 1, 2, 3]
    assert same(saved["model"], snaps[1]) and not same(saved["model"], snaps[3])
    assert saved["epoch"] == 4
    assert saved["meta"]["selection"] == {
        "rule": "best", "epoch": 1, "val_top1": 30.0, "val_loss": 0.8, "split": "validation",
        "epochs_run": 4, "stopped_early": True, "patience": 2}
    val = records(tmp_path / "full", "val")
    assert [(r["epoch"], r["step"], r["val_loss"], r["val_top1"]) for r in val] == [
        (e, (e + 1) * STEPS_PER_EPOCH, LOSSES[e], TOP1S[e]) for e in range(4)]
    assert records(tmp_path / "full", "end")[0]["epoch"] == 4
    assert not (tmp_path / "full" / "checkpoint-last.pt").exists()

    # patience 0: all 6 epochs, the best is then epoch 5
    snaps = {}
    scripted_run(tmp_path / "nostop", snaps, patience=0)
    saved = torch.load(tmp_path / "nostop" / "checkpoint.pt", weights_only=True)
    assert saved["meta"]["selection"]["epoch"] == 5
    assert saved["meta"]["selection"]["stopped_early"] is False
    assert same(saved["model"], snaps[5])


def test_resumed_run_keeps_its_best_so_far(tmp_path):
    """Interrupted at the end of epoch 1's steps (before its validation) and in the middle of
    epoch 3 (best = epoch 1, one bad epoch counted): the resumed run stops where the
    uninterrupted one does, with the same best weights, and logs each validation once."""
    snaps = {}
    scripted_run(tmp_path / "full", snaps)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    out = tmp_path / "split"
    assert scripted_run(out, max_steps=2 * STEPS_PER_EPOCH).status == "stopped"
    assert scripted_run(out, max_steps=3 * STEPS_PER_EPOCH + 2).status == "stopped"
    last = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert last["epoch_end"]["state"]["best_epoch"] == 1
    assert last["epoch_end"]["state"]["bad_epochs"] == 1
    result = scripted_run(out)
    assert result.status == "finished" and result.epoch == 4
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert same(resumed["model"], full["model"]) and same(resumed["model"], snaps[1])
    assert resumed["meta"]["selection"] == full["meta"]["selection"]
    assert [r["epoch"] for r in records(out, "val")] == [0, 1, 2, 3]


def test_validation_does_not_change_training(tmp_path):
    """The hook's validation (here on clips that draw from the global RNG, as augmentations
    do) leaves the training's random streams alone: the same losses as without the hook."""
    ft = dict(load_config()["finetune"], epochs=2, warmup_epochs=0.5, batch_size=4,
              accum_steps=1, total_batch=4, base_lr=1e-2, log_interval=1, seed=0)
    from mofo.models.build import build_classifier
    from mofo.training.finetune import finetune_task

    def go(out, with_hook):
        torch.manual_seed(0)
        model = build_classifier(MODEL_CFG, 4, pooling="mean", depth=1)
        train_set = SyntheticClipDataset(8, MODEL_CFG, global_rng_jitter=0.1)
        loader = DataLoader(train_set, batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator())
        val = DataLoader(SyntheticClipDataset(4, MODEL_CFG, seed=1, global_rng_jitter=0.1),
                         batch_size=2)
        hook = BestEpochSelection(
            lambda m, _e: validation_metrics(m, val, ["label"], CTX, ENGINE), CTX, 0, "validation")
        return engine.train(model, loader, finetune_task({"label": 4}, None, 0.0),
                            stage_cfg=ft, engine_cfg=ENGINE, ctx=CTX, out_dir=out,
                            hash_config={"ft": ft}, epoch_end=hook if with_hook else None)

    plain, hooked = go(tmp_path / "plain", False), go(tmp_path / "hooked", True)
    assert hooked.losses == plain.losses
    assert len(records(tmp_path / "hooked", "val")) == 2


# --------------------------------------------------------------------------- provenance
def test_selection_keys_change_the_finetune_hash_only_with_selection_best():
    base = load_config()
    without = load_config()
    for key in ("selection", "patience"):
        without["finetune"].pop(key)
    assert stage_hash(base, "finetune") == stage_hash(without, "finetune")  # nothing reruns

    def hash_(**over):
        ft = {k: v for k, v in over.items() if k != "split"}
        ev = {"split": over["split"]} if "split" in over else {}
        return stage_hash(load_config(overrides={"finetune": ft, "evaluate": ev}), "finetune")

    assert hash_(patience=3) == hash_(split="test") == stage_hash(base, "finetune")
    best = hash_(selection="best")
    assert best != stage_hash(base, "finetune")
    assert hash_(selection="best", patience=3) != best
    assert hash_(selection="best", split="test") != best


# --------------------------------------------------------------------------- the real stage
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny frame store of tests/test_dataset.py: 3 train clips, 1 validation clip (c4,
    whose (verb, noun) pair is made a train pair so that EPIC's action head knows it)."""
    from tests.test_dataset import make_results

    root = tmp_path_factory.mktemp("selection") / "demo"
    manifest = make_results(root)
    manifest["label"] = manifest["label"] % 3
    manifest.loc[manifest["clip_id"] == "c4", ["verb_class", "noun_class"]] = (0, 10)
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


def test_finetune_with_selection_best_on_the_frame_store(store, tmp_path):
    """finetune.run with selection best on the tiny frame store: validation after every
    epoch, the rule's decisions match the logged numbers, and the evaluation's metrics.json
    carries the checkpoint's selection."""
    from mofo.evaluation import evaluate
    from mofo.training import finetune
    from tests.test_training_stages import tiny_config

    root = store
    cfg = tiny_config(finetune={"epochs": 4, "selection": "best", "patience": 1},
                      augment={"test_clips": 1, "test_crops": 1})
    ckpt = finetune.run(cfg, root / "manifest.csv", root, None, "mean", tmp_path / "ft")
    assert ckpt.name == "checkpoint.pt"
    selection = torch.load(ckpt, weights_only=True)["meta"]["selection"]
    val = records(tmp_path / "ft", "val")
    assert all(r["val_clips"] == 1 and r["val_top1"] in (0.0, 100.0) for r in val)
    state, stopped = run_rule([r["val_loss"] for r in val], [r["val_top1"] for r in val], 1)
    assert selection == {
        "rule": "best", "epoch": state.best_epoch, "val_top1": state.best_top1,
        "val_loss": state.best_loss, "split": "validation", "epochs_run": len(val),
        "stopped_early": stopped is not None, "patience": 1}
    assert stopped is None or stopped == len(val) - 1
    metrics = evaluate.run(cfg, root / "manifest.csv", root, ckpt, "mean", tmp_path / "ev")
    assert metrics["selection"] == selection
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["selection"] == selection


def test_finetune_selection_best_with_the_epic_action_classifier(store, tmp_path):
    """The action head's validation targets come from the (verb, noun) pairs."""
    from mofo.training import finetune
    from tests.test_training_stages import tiny_config

    cfg = tiny_config(dataset={"name": "epic100", "epic100": {"classifier": "action"}},
                      finetune={"epochs": 2, "selection": "best"})
    ckpt = finetune.run(cfg, store / "manifest.csv", store, None, "mean", tmp_path / "ft")
    assert torch.load(ckpt, weights_only=True)["meta"]["selection"]["epochs_run"] == 2
    val = records(tmp_path / "ft", "val")
    assert [r["val_clips"] for r in val] == [1, 1] and "val_action_top1" not in val[0]


# --------------------------------------------------------------------------- two processes
DDP_SCRIPT = '''
import json, sys
import torch
from torch.utils.data import DataLoader, Subset
from mofo.config import load_config
from mofo.runtime.loader import make_loader
from mofo.models.build import build_classifier
from mofo.training import engine
from mofo.runtime.device import seed_everything
from mofo.runtime.distributed import cleanup_distributed, init_distributed
from mofo.training.finetune import finetune_task
from mofo.training.selection import BestEpochSelection, validation_metrics
from mofo.bench.synthetic import SyntheticClipDataset

out, model_cfg, losses = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(1)
engine_cfg = {**load_config()["engine"], "device": "cpu", "resume": False}
ctx = init_distributed(engine_cfg)
rank, world = ctx.info.rank, ctx.world_size
ft = dict(load_config()["finetune"], epochs=len(losses), warmup_epochs=0.5, batch_size=4,
          accum_steps=1, total_batch=8, base_lr=1e-2, log_interval=1, seed=0)
loader = make_loader(SyntheticClipDataset(16, model_cfg), 4, 0, shuffle=True, seed=0,
                     drop_last=True, distributed=True)
val_set = SyntheticClipDataset(5, model_cfg, seed=1)
val = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=2)

def measure(model, epoch):  # real, all-reduced validation; scripted loss
    return {**validation_metrics(model, val, ["label"], ctx, engine_cfg),
            "val_loss": losses[epoch]}

hook = BestEpochSelection(measure, ctx, 2 if rank == 0 else 0, "validation")
seed_everything(0)
model = build_classifier(model_cfg, 4, pooling="mean", depth=1)
result = engine.train(model, loader, finetune_task({"label": 4}, None, 0.0), stage_cfg=ft,
                      engine_cfg=engine_cfg, ctx=ctx, out_dir=out, hash_config={"ft": ft},
                      epoch_end=hook)
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump({"epoch": result.epoch, "stopped": hook.stopped_early,
               "state": hook.state.__dict__}, fh)
cleanup_distributed()
'''


@pytest.mark.distributed
def test_two_processes_validate_their_shares_and_stop_together(tmp_path):
    """torchrun, 2 CPU processes: each validates half the clips (the sums are all-reduced, so
    both see the same top-1 over all 5 clips); only rank 0's rule would stop (patience 2 vs
    0), and both stop after the same epoch."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_selection.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(tmp_path), json.dumps(MODEL_CFG), json.dumps(LOSSES)],
        capture_output=True, text=True, timeout=180, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert a["epoch"] == b["epoch"] == 4 and a["stopped"] and b["stopped"]
    assert a["state"]["best_top1"] == b["state"]["best_top1"]
    assert [r["val_clips"] for r in records(tmp_path, "val")] == [5] * 4
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["meta"]["selection"]["epochs_run"] == 4
