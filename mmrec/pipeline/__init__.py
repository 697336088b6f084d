"""What the DVC stages drive: one rung end to end (rung), its outputs (outputs), the evaluate stage
(evaluate), the sweep of dead attempts (cleanup) and what a rerun does with an interrupted stage (rerun)."""
