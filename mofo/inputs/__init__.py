"""The training input pipeline: clip sampling, transforms and the clip dataset."""
