"""Which training jobs a Snakemake invocation forced (``mofo.training.restart``), and resume
checkpoints that load weights-only (``mofo.training.resume_state``).

The end-to-end rows of the table in docs/RERUNS.md ("When training restarts and when it resumes")
are in ``tests/test_resume_rows.py``; these are the pieces, fast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mofo.training import resume_state
from mofo.training.engine import _resume_point
from mofo.training.restart import (
    FORCED_ENV,
    FORCED_MARKER,
    discard_if_forced,
    forced_environment,
    forced_invocation,
)
from mofo.training.resume_state import UnsafeCheckpointError


def dag_settings(forcerun=(), forceall=False, forcetargets=False, targets=()):
    """The fields of Snakemake's DAGSettings that ``forced_environment`` reads."""
    return SimpleNamespace(forcerun=frozenset(forcerun), forceall=forceall,
                           forcetargets=forcetargets, targets=frozenset(targets))


def test_forced_environment_names_rules_files_and_targets(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = "results/finetune/mofo-mean/s0/checkpoint.pt"
    env = forced_environment(dag_settings(forcerun={"pretrain"}))
    assert forced_invocation("pretrain", ["x/checkpoint.pt"], env)
    assert forced_invocation("finetune", [out], env) is None
    # -R <file>: relative to the working directory, matched on the job's absolute output.
    env = forced_environment(dag_settings(forcerun={out}))
    assert forced_invocation("finetune", [str(tmp_path / out)], env)
    assert forced_invocation("finetune", [str(tmp_path / "other.pt")], env) is None
    # -f: the targets; without -f the targets force nothing.
    assert forced_invocation("finetune", [out], forced_environment(
        dag_settings(forcetargets=True, targets={out})))
    assert forced_invocation("finetune", [out], forced_environment(
        dag_settings(targets={out}))) is None
    # -F: everything.
    assert forced_invocation("evaluate", [], forced_environment(dag_settings(forceall=True)))
    # Nothing forced, or no variable at all (a stage started by hand): nothing.
    assert forced_invocation("finetune", [out], forced_environment(dag_settings())) is None
    assert forced_invocation("finetune", [out], {}) is None


def test_every_invocation_gets_its_own_id():
    a, b = (json.loads(forced_environment(dag_settings())[FORCED_ENV]) for _ in range(2))
    assert a["invocation"] != b["invocation"]


def test_a_forced_job_discards_the_checkpoint_on_its_first_attempt_only(tmp_path: Path):
    last = tmp_path / "checkpoint-last.pt"
    last.write_bytes(b"an earlier run's checkpoint")
    first = forced_environment(dag_settings(forcerun={"finetune"}))
    assert discard_if_forced("finetune", ["ck.pt"], tmp_path, first)
    assert not last.exists()
    # The interrupted first attempt wrote a new checkpoint; its retry (same invocation) keeps it.
    last.write_bytes(b"this invocation's checkpoint")
    assert not discard_if_forced("finetune", ["ck.pt"], tmp_path, first)
    assert last.exists()
    # A later forced invocation discards it again; an unforced one never does.
    assert not discard_if_forced("finetune", ["ck.pt"], tmp_path,
                                 forced_environment(dag_settings()))
    assert last.exists()
    assert discard_if_forced("finetune", ["ck.pt"], tmp_path,
                             forced_environment(dag_settings(forcerun={"finetune"})))
    assert not last.exists() and (tmp_path / FORCED_MARKER).exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path):
    state = resume_state.capture_rng_state()
    expected = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    path = resume_state.atomic_torch_save({"model": {}, "rng": [state]}, tmp_path / "ck.pt")
    torch.load(path, weights_only=True)  # plain values and tensors only
    resume_state.restore_rng_state(resume_state.load_checkpoint(path)["rng"][0])
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


class Planted:
    """Unpickling this runs code: it writes ``ran`` next to the checkpoint."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return exec, (f"open({str(self.witness)!r}, 'w').write('ran')",)


def test_a_planted_pickle_in_checkpoint_last_is_refused_and_does_not_run(tmp_path: Path):
    witness, path = tmp_path / "ran", tmp_path / "checkpoint-last.pt"
    torch.save({"model": {}, "config_hash": "h", "payload": Planted(witness)}, path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        resume_state.load_checkpoint(path)
    # ... and the same through the engine's resume, which every training stage takes.
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        _resume_point(path, {}, "h", None, None, None, None, {"resume": True}, "train")
    assert not witness.exists(), "the planted code ran"


def test_a_format_1_checkpoint_with_numpy_states_is_refused_naming_the_file(tmp_path: Path):
    path = tmp_path / "checkpoint-last.pt"
    torch.save({"model": {}, "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}.*delete it"):
        resume_state.load_checkpoint(path)
