"""The model registry: the promotion gate and alias rule (gate), per-document scores and the paired bootstrap
(paired), registered versions, the served pyfunc and the `python -m mmrec.registry` CLI (models), the lease under
which one promotion at a time moves a model's aliases (lease)."""
