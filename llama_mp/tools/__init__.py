"""Questions about a model and a machine: will it fit (plan.py), how fast is it (bench.py)."""
