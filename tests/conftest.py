"""Suite-wide settings: one intra-op thread per process; Triton's interpreter without a GPU.

The DDP tests start several processes on a 2-core machine; with torch's default of one
thread per core they oversubscribe it and spin. Child processes inherit OMP_NUM_THREADS.

Without CUDA, ``backend="triton"`` runs on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which must be set before triton is first imported. On a GPU
machine it stays unset so that the Triton tests compile and run the real kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
