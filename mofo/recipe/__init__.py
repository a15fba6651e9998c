"""What a training run is meant to be: the published recipe and its global batch.

``published``: the paper rerun's settings with their sources (``config/published.yaml``) and
how a configuration deviates from them; ``batch``: a recipe's total batch split over the
processes a job really gets, with VideoMAE's lr scaling. Both read configuration only (no
torch), so the Snakefile and ``mofo config`` use them before anything runs.
"""
