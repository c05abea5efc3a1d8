"""Training infrastructure for pretraining, one concept per module (import them directly):

- :mod:`dagman.train.schedules`   per-step lr / weight decay / teacher temperatures / EMA momentum / freeze
- :mod:`dagman.train.optim`       AdamW parameter groups, per-step lr & weight decay, last-layer freeze, clipping
- :mod:`dagman.train.ema`         teacher = exact copy of the student, then EMA over matched parameter names
- :mod:`dagman.train.checkpoint`  atomic, weights-only checkpoints; run-folder helpers; encoder.safetensors; RNG
- :mod:`dagman.train.logging`     metrics.jsonl + TensorBoard, consistent across resume
- :mod:`dagman.train.distributed` single process without a process group, or torchrun DDP (nccl / gloo)

Nothing is imported here, so importing one module does not pull in the others (e.g. TensorBoard).
"""
