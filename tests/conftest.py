"""Suite-wide settings: one intra-op thread per process.

The DDP tests start several processes on a 2-core machine; with torch's default of one
thread per core they oversubscribe it and spin. Child processes inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
