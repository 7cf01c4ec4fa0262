"""trkit: teach Qwen3 Turkish on one GPU.

Components live one concept per module (``vocab``, ``embeddings``, ``dora``, ``sophia``, ...);
the notebooks in ``notebooks/`` and ``python -m trkit <stage>`` are thin recipes over them.
Importing ``trkit`` is cheap on purpose: no module here imports torch at import time except
the ones that are torch components themselves (``dora``, ``neftune``, ``sophia``), and this
package file imports none of them.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every import on CPUs
# with AVX512-BF16 (an optional faster kernel from the hub; the built-in one is used). It is harmless
# (../shared/OFFLINE.md) and would otherwise open every notebook output: show only its errors.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
