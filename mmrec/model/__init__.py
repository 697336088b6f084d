"""The networks and what runs them: MM-Rec and GPT (lm) over the chunked scan (scan), function-preserving
growth (growth), scoring and generation (inference), weights-only checkpoints (checkpoint).
docs/model.md states the design. No MLflow, DVC or YAML here."""
