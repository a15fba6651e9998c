"""What each stage reads (mofo.provenance): the declaration, exclusions and input digests."""

from __future__ import annotations

import pytest

from mofo.config import load_config
from mofo.provenance import (
    STAGE_READS,
    UnknownStageError,
    file_digest,
    inputs_digest,
    stage_hash,
    stage_settings,
)


def test_settings_hold_what_a_stage_reads_and_not_what_it_ignores():
    cfg = load_config()
    pre = stage_settings(cfg, "pretrain")
    assert pre["model"] == cfg["model"] and pre["masking"] == {"ratio": 0.9, "inbox_ratio": 0.75,
                                                          "everest": {"drop_ratio": 0.7}}
    assert "num_workers" not in pre["pretrain"] and "log_interval" not in pre["pretrain"]
    assert pre["pretrain"]["base_lr"] == cfg["pretrain"]["base_lr"]
    assert stage_settings(cfg, "decode") == {"decode": {k: v for k, v in cfg["decode"].items()
                                                        if k != "threads"}}
    with pytest.raises(UnknownStageError, match="no declaration of what stage 'nope' reads"):
        stage_settings(cfg, "nope")


def test_every_rule_with_a_config_hash_is_declared():
    import re
    from pathlib import Path

    rules = Path(__file__).resolve().parent.parent / "rules"
    named = {m for f in rules.glob("*.smk") for m in re.findall(r'stage_hash\(config, "(\w+)"\)',
                                                                f.read_text())}
    assert named and named <= set(STAGE_READS), named - set(STAGE_READS)


def test_hash_changes_only_with_what_is_read():
    cfg = load_config()
    other = load_config(overrides={"pretrain": {"log_interval": 99}, "augment": {"test_crops": 1}})
    assert stage_hash(cfg, "pretrain") == stage_hash(other, "pretrain")
    assert stage_hash(cfg, "finetune") == stage_hash(other, "finetune")
    assert stage_hash(cfg, "evaluate") != stage_hash(other, "evaluate")


@pytest.mark.parametrize("key, value, stages", [
    ("classifier", "action", {"finetune", "evaluate"}),
    ("horizontal_flip", False, {"finetune"}),
])
def test_epic_recipe_keys_rerun_finetune_and_evaluate_only(key, value, stages):
    """dataset.epic100.classifier / horizontal_flip rerun what reads them, and not the
    manifest (which reads the rest of the dataset section): no decoding anew."""
    cfg = load_config()
    other = load_config(overrides={"dataset": {"epic100": {key: value}}})
    changed = {s for s in STAGE_READS if stage_hash(cfg, s) != stage_hash(other, s)}
    assert changed == stages
    assert stage_settings(other, "manifest") == stage_settings(cfg, "manifest")


def test_digests_follow_content_and_folders(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("x\n1\n")
    before = file_digest(a)
    a.write_text("x\n2\n")
    assert file_digest(a) != before
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    d1 = file_digest(folder)
    (folder / "model.safetensors").write_bytes(b"\1" * 100)
    assert file_digest(folder) != d1
    assert inputs_digest({"m": a, "gone": tmp_path / "nope", "none": None})["gone"] == "absent"


def test_large_files_are_digested_by_size_and_edges(tmp_path, monkeypatch):
    import mofo.provenance as prov

    monkeypatch.setattr(prov, "WHOLE_FILE_LIMIT", 10)
    monkeypatch.setattr(prov, "_EDGE", 4)
    big = tmp_path / "ckpt.pt"
    big.write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    d = file_digest(big)
    big.write_bytes(b"abcdefghijklmnXpqrstuvwxyz")  # the middle: not seen, as documented
    assert file_digest(big) == d
    big.write_bytes(b"abcdefghijklmnopqrstuvwxyZ")  # the tail: a zip's CRC directory
    assert file_digest(big) != d
