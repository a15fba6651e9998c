"""VideoMAE models (encoder, pretraining autoencoder, classifiers), heads and checkpoints.

Inside the package: ``layers`` (blocks, position table, inits) and ``patches`` (clips <->
pixel tokens) are the bottom; ``heads`` and ``vit`` build on ``layers``; ``build`` makes the
models from the config; ``checkpoint`` loads VideoMAE / MOFO files into them.
"""

from mofo.models.build import (
    build_classifier,
    build_encoder,
    build_model,
    build_pretrain_model,
)
from mofo.models.checkpoint import CheckpointError, LoadReport, load_pretrained
from mofo.models.heads import MeanPoolHead, MotionCrossAttentionHead
from mofo.models.layers import sincos_position_table
from mofo.models.patches import denormalize, patchify, pixel_targets, unpatchify
from mofo.models.vit import (
    MODEL_SIZES,
    PretrainVideoMAE,
    VideoClassifier,
    VideoEncoder,
    ViTSpec,
    layer_id_for_lr_decay,
    model_spec,
)

__all__ = [
    "MODEL_SIZES",
    "CheckpointError",
    "LoadReport",
    "MeanPoolHead",
    "MotionCrossAttentionHead",
    "PretrainVideoMAE",
    "ViTSpec",
    "VideoClassifier",
    "VideoEncoder",
    "build_classifier",
    "build_encoder",
    "build_model",
    "build_pretrain_model",
    "denormalize",
    "layer_id_for_lr_decay",
    "load_pretrained",
    "model_spec",
    "patchify",
    "pixel_targets",
    "sincos_position_table",
    "unpatchify",
]
