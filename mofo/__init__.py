"""mofo: motion-focused self-supervised video pretraining (MOFO on top of VideoMAE).

The library is importable without Snakemake: ``mofo.data`` (datasets, manifest, decoding),
``mofo.motion`` (flow, motion maps, boxes), ``mofo.masking``, ``mofo.models``,
``mofo.training``, ``mofo.evaluation`` and ``mofo.tracking``.
"""

__version__ = "0.1.0"
