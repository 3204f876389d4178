"""Shared test settings: hypothesis profiles and the torch thread count."""
import os

import torch
from hypothesis import HealthCheck, settings

# "ci" keeps `make test` within its budget on 2 cores; "thorough" for `make test-all` and local runs.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

# tests/op_samples.py (the shared sample inputs) is imported by tests here and in tests/cuda.
import sys  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
