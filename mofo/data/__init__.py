"""Datasets, the clip manifest, the demo generator, decoding and the training data loader."""

# PyAV must be loaded before decord: decord's wheel bundles an older libvpx, and if it is
# loaded first PyAV's VP9 (.webm) encoder fails to open (avcodec_open2 returns 22).
import av  # noqa: F401
