"""trkit: teach Qwen3 Turkish on one GPU.

Components live one concept per module (``vocab``, ``embeddings``, ``dora``, ``sophia``, ...);
the notebooks in ``notebooks/`` and ``python -m trkit <stage>`` are thin recipes over them.
Importing ``trkit`` is cheap on purpose: no module here imports torch at import time except
the ones that are torch components themselves (``dora``, ``neftune``, ``sophia``), and this
package file imports none of them.
"""

__version__ = "0.1.0"
