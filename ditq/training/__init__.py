"""DiT training, split by concept: `config` (TrainConfig), `data` (data sources), `losses` (diffusion,
distillation), `distributed` (ranks, devices), `rng` (random streams), `checkpoint` (files), `loop` (train).

The public entry point is `ditq.train` (`train`, `TrainConfig`, `export_fp16`, `main`); QAT recipes and
`prepare`/`convert` live in `ditq.qat`.
"""
