"""Load VideoMAE / MOFO checkpoints (pretraining or fine-tuned) into our models.

Rules (each decision is recorded in the returned :class:`LoadReport`):

* the state dict may sit under ``model``, ``module`` or ``state_dict``, or be bare; a DDP
  ``module.`` and a ``torch.compile`` ``_orig_mod.`` prefix are removed (other code's
  checkpoints of compiled models carry it; VideoMAE V2's issue #33);
* a pretraining checkpoint (``encoder.*`` keys) loaded into a classifier/encoder: ``encoder.``
  is stripped and the decoder side (``decoder.*``, ``encoder_to_decoder``, ``mask_token``, the
  decoder ``pos_embed``) is dropped; ``norm.*`` is dropped when the model normalises after
  pooling (VideoMAE's classifiers: ``fc_norm`` is then newly initialised);
* ``pos_embed``: our tables are fixed sine-cosine buffers. A checkpoint table equal to ours is
  verified and skipped; a different table of the same shape (a learned embedding) is loaded
  into the buffer, which then stays in the model's ``state_dict()`` (saved with the weights,
  see ``PositionTableModule``); a different shape is an error (nothing is interpolated);
* any other shape mismatch is an error naming the key and both shapes, except the classifier
  output layers (``head.*``), which keep their fresh initialisation when the class count
  differs;
* with ``strict_report=True`` a missing backbone key or an unexplained checkpoint key raises;
  missing head-side keys (``fc_norm``, ``head``, ``cross_block``) are always allowed and listed
  as initialised.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mofo.models.hf import HFCheckpointError, is_hf_folder, match_hf_norm_eps, read_hf_folder
from mofo.models.layers import sincos_position_table
from mofo.models.vit import PretrainVideoMAE, VideoEncoder

POS_EMBED_ATOL = 1e-4  # released tables were computed in float64 numpy and stored as float32
DECODER_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token")
BACKBONE_PREFIXES = ("patch_embed.", "blocks.", "norm.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded as asked; the message names the file and the key."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with every key."""

    source: str
    checkpoint_format: str  # "pretrain" (encoder.* keys) or "finetune"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone keys the checkpoint lacks
    initialised: list[str] = field(default_factory=list)  # head-side keys left at their init
    reinitialised_head: list[str] = field(default_factory=list)  # head keys with other shapes
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    unexpected: list[str] = field(default_factory=list)
    pos_embed: dict[str, str] = field(default_factory=dict)  # buffer -> verified|loaded|absent
    notes: list[str] = field(default_factory=list)  # e.g. a Hugging Face folder's LayerNorm eps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.source} ({self.checkpoint_format}): {len(self.loaded)} loaded, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.dropped)} dropped, {len(self.initialised)} head keys initialised, "
            f"head re-initialised: {bool(self.reinitialised_head)}, pos_embed: {self.pos_embed}"
            + "".join(f"; {note}" for note in self.notes)
        )


def read_state_dict(path_or_state: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The tensors of a checkpoint file or dict and a name for messages."""
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            # VideoMAE's training checkpoints also pickle the argparse Namespace of the run;
            # allow that one plain class and nothing else (weights_only stays on).
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure: re-raised with the file name
            raise CheckpointError(
                f"{path}: cannot be read as a weights-only checkpoint: {exc}"
            ) from exc
        source = str(path)
    else:
        obj, source = path_or_state, "<state dict>"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    for key in ("model", "module", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {_plain_key(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{source}: no tensors found (keys: {sorted(obj)[:10]})")
    return state, source


def _is_pretrain_format(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("encoder.", "backbone.")) for k in state)


def _map_to_encoder(
    state: dict[str, Tensor], model: VideoEncoder, report: LoadReport
) -> dict[str, Tensor]:
    """Rename a pretraining state dict for an encoder/classifier, dropping the decoder."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(DECODER_PREFIXES) or key == "pos_embed":
            report.dropped[key] = "pretraining decoder"
        elif key.startswith(("encoder.", "backbone.")):
            mapped[key.split(".", 1)[1]] = value
        else:
            mapped[key] = value
    if isinstance(model.norm, nn.Identity):
        for key in [k for k in mapped if k.startswith("norm.")]:
            del mapped[key]
            report.dropped[f"encoder.{key}"] = "classifier normalises after pooling (fc_norm)"
    return mapped


def _map_to_pretrain(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """A fine-tuned encoder into a pretraining model: prefix ``encoder.``, drop the head."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(("fc_norm.", "head.", "cross_block.")):
            report.dropped[key] = "classifier head (not part of the pretraining model)"
        elif key.startswith(DECODER_PREFIXES):
            mapped[key] = value
        else:
            mapped[f"encoder.{key}"] = value
    return mapped


def _handle_pos_embed(model: nn.Module, state: dict[str, Tensor], report: LoadReport) -> None:
    """Verify or load every ``*pos_embed`` the checkpoint has against our fixed buffers."""
    buffers = dict(model.named_buffers())
    saved = set(model.state_dict())  # tables already holding a loaded (persistent) table
    for name, buf in buffers.items():
        if not name.endswith("pos_embed"):
            continue
        if name not in state:
            report.pos_embed[name] = "absent (fixed sine-cosine)"
            continue
        value = state.pop(name)
        if value.numel() == buf.numel() and value.shape != buf.shape:
            value = value.reshape(buf.shape)  # (N, D) vs (1, N, D)
        if value.shape != buf.shape:
            raise CheckpointError(
                f"{report.source}: {name} has shape {tuple(value.shape)}, the model "
                f"needs {tuple(buf.shape)} (a different input size, frame count or "
                f"patch size; positions are not interpolated)"
            )
        if buf.is_meta or value.is_meta:
            report.pos_embed[name] = "shape verified (meta tensors)"
            continue
        expected = sincos_position_table(buf.shape[1], buf.shape[2])
        if torch.allclose(value.float(), expected, atol=POS_EMBED_ATOL):
            report.pos_embed[name] = "verified (fixed sine-cosine)"
            if name in saved:  # replaces a table loaded earlier
                state[name] = value
        else:
            # Loaded with the other weights below; persistent, so state_dict() keeps it.
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, buf, persistent=True)
            state[name] = value
            report.pos_embed[name] = "loaded (learned table differs from sine-cosine)"
    for key in [k for k in state if k.endswith("pos_embed") and k not in buffers]:
        report.dropped[key] = "position table the model does not have"
        del state[key]


def _is_output_layer(key: str) -> bool:
    return key.startswith("head.")


def _is_backbone(key: str, pretrain: bool) -> bool:
    if pretrain:
        return key.startswith("encoder.") or key.startswith(DECODER_PREFIXES)
    return key.startswith(BACKBONE_PREFIXES)


def _plain_key(key: str) -> str:
    """``key`` without the wrapper prefixes of DDP (``module.``) and torch.compile
    (``_orig_mod.``), in either order."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def load_pretrained(
    model: nn.Module, path_or_state: str | Path | Mapping[str, Any], strict_report: bool = True
) -> LoadReport:
    """Load a VideoMAE/MOFO checkpoint (file, dict, or a Hugging Face VideoMAE folder with
    ``config.json``, see :mod:`mofo.models.hf`) into ``model``; see the module doc.

    ``model`` is a :class:`PretrainVideoMAE`, a :class:`VideoEncoder` or a ``VideoClassifier``.
    Returns the :class:`LoadReport`; raises :class:`CheckpointError` on shape mismatches and,
    with ``strict_report``, on missing backbone keys or unexplained checkpoint keys.
    """
    hf_config = None
    if isinstance(path_or_state, (str, Path)) and is_hf_folder(path_or_state):
        try:
            state, hf_config = read_hf_folder(path_or_state)
        except (HFCheckpointError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path_or_state}: {exc}") from exc
        source = str(path_or_state)
    else:
        state, source = read_state_dict(path_or_state)
    is_pretrain_model = isinstance(model, PretrainVideoMAE)
    report = LoadReport(source, "pretrain" if _is_pretrain_format(state) else "finetune")
    if hf_config is not None:
        report.notes = ["Hugging Face VideoMAE folder", *match_hf_norm_eps(hf_config, model)]
    if is_pretrain_model and report.checkpoint_format == "finetune":
        state = _map_to_pretrain(state, report)
    elif not is_pretrain_model:
        if not isinstance(model, VideoEncoder):
            raise CheckpointError(f"cannot load {source} into a {type(model).__name__}")
        if report.checkpoint_format == "pretrain":
            state = _map_to_encoder(state, model, report)
    _handle_pos_embed(model, state, report)

    own = model.state_dict()
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            if _is_output_layer(key):
                report.dropped[key] = "classifier output layer the model does not have"
            else:
                report.unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if _is_output_layer(key):
                report.reinitialised_head.append(key)
                continue
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the model"
            )
        to_load[key] = value
    for key in own:
        if key in to_load:
            report.loaded.append(key)
        elif _is_backbone(key, is_pretrain_model):
            report.missing.append(key)
        else:
            report.initialised.append(key)
    if strict_report and (report.missing or report.unexpected):
        raise CheckpointError(
            f"{source}: missing keys {report.missing[:10]} "
            f"(of {len(report.missing)}), unexpected keys "
            f"{report.unexpected[:10]} (of {len(report.unexpected)})"
        )
    model.load_state_dict(to_load, strict=False)
    return report


def pretrained_meta(pretrained_ckpt: str | Path | None) -> dict:
    """``meta`` of one of our checkpoints ({} for official files or no checkpoint)."""
    if not pretrained_ckpt:
        return {}
    try:
        obj = torch.load(pretrained_ckpt, map_location="cpu", weights_only=True,
                         mmap=True)
    except Exception:  # official files may pickle extra objects
        return {}
    return dict(obj.get("meta") or {}) if isinstance(obj, dict) else {}
