"""trkit: teach Qwen3 Turkish on one GPU.

Components live one concept per module (``vocab``, ``embeddings``, ``dora``, ``sophia``, ...);
the notebooks in ``notebooks/`` and ``python -m trkit <stage>`` are thin recipes over them.
Importing ``trkit`` is cheap on purpose: no module here imports torch at import time except
the ones that are torch components themselves (``dora``, ``neftune``, ``sophia``), and this
package file imports none of them.
"""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# OpenMP threads that spin while they wait make PyTorch 20-50x slower on a CPU that other processes also use
# (a 2-core machine running a test suite beside a notebook: one SmolLM2 training step 20-40 s instead of ~1 s,
# measured). Sleeping waiters cost nothing measurable on an idle machine. OpenMP reads this once, when torch is
# first imported, so it is set here (trkit imports torch lazily) unless the user chose a policy.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every import on CPUs
# with AVX512-BF16 (an optional faster kernel from the hub; the built-in one is used). It is harmless
# (../shared/OFFLINE.md) and would otherwise open every notebook output: show only its errors.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
