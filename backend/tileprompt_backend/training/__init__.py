"""Admin training: data preparation, PAINT patching, cross-modal alignment, evaluation.

Shared by every method (docs/training.md): ``data`` (readers, webdataset shards + manifest, deterministic
rank/worker streams), ``inputs`` (raw tiles -> model input through the engine's preprocessing), ``augment``
(raw-tile augmentations), ``heads`` (frozen zero-shot heads), ``losses``, ``metrics``, ``loop`` (optimiser,
schedule, DDP, progress, checkpoints, resume), ``checkpoints``, ``distributed``, ``runlog``, ``cards``
(atomic card writing) and ``command`` (CLI conventions). Methods: ``patch``, ``align``; ``evaluate`` and
``prepare`` are commands too. Run as ``tileprompt train METHOD`` or
``torchrun ... -m tileprompt_backend.training.METHOD``.

Nothing in engine, index, jobs or server imports this package; it imports models, sentinel2, tiling and the
engine's zero-shot head and prompt helpers.
"""
