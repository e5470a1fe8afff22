"""Suite-wide set-up: with pytest-xdist, each of the workers gets one intra-op thread.

Two workers on a 2-core machine already keep both cores busy; torch's default of one thread per core
in each would oversubscribe them (OpenMP threads spin while they wait).
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses tests start
    torch.set_num_threads(1)
