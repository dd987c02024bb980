"""DiT training, split by concept: `config` (TrainConfig), `data` (data sources, batch order), `losses`
(diffusion, distillation), `distributed` (ranks, devices), `rng` (random streams), `checkpoint` (files),
`log` (log.jsonl), `interrupt` (Ctrl-C), `loop` (train).

The public entry point is `ditq.train` (`train`, `TrainConfig`, `export_fp16`, `main`); QAT recipes and
`prepare`/`convert` live in `ditq.qat`.
"""
