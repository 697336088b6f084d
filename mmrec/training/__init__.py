"""The training loop (loop) and what it leans on: budget and lr schedule, EMA of the weights, peak FLOP/s for
MFU, the device, data-parallel plumbing, and the CPU threads a training may use (cores)."""
