"""VideoMAE models (encoder, pretraining autoencoder, classifiers), heads and checkpoints."""

from mofo.models.checkpoint import CheckpointError, LoadReport, load_pretrained
from mofo.models.heads import MeanPoolHead, MotionCrossAttentionHead
from mofo.models.vit import (
    MODEL_SIZES,
    PretrainVideoMAE,
    VideoClassifier,
    VideoEncoder,
    ViTSpec,
    build_classifier,
    build_encoder,
    build_pretrain_model,
    layer_id_for_lr_decay,
    model_spec,
    patchify,
    pixel_targets,
    sincos_position_table,
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
    "build_pretrain_model",
    "layer_id_for_lr_decay",
    "load_pretrained",
    "model_spec",
    "patchify",
    "pixel_targets",
    "sincos_position_table",
]
