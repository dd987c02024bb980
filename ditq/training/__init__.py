"""DiT training, split by concept: `config` (TrainConfig), `distributed` (ranks, devices), `rng`
(random streams), `checkpoint` (files), `loop` (train).

The public entry point is `ditq.train` (`train`, `TrainConfig`, `export_fp16`, `main`).
"""
