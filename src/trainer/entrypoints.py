"""Every module this package starts by name, in one place: as a child process (`python -m MODULE`) or, for the
training backend, imported by a dotted path. Layers below the engine may not import it (it imports MLX), so they name
it here; tests/test_layout.py checks that each resolves and that the layer which starts it may do so.
"""

from __future__ import annotations

import sys

#: the training worker, started by the runner (and by rank 0 for the other ranks of a run)
WORKER = "trainer.lifecycle.worker"
#: the MLX training backend, imported in the worker by `lifecycle.backend.load_backend`
TRAINING_BACKEND = "trainer.engine.mlx_backend:MlxTrainingBackend"
#: a GGUF file imported as an MLX model folder (MLX's reader may crash on a damaged file: never in the server)
GGUF_IMPORT = "trainer.engine.gguf"
#: an adapter fused into its base
FUSE = "trainer.engine.fuse"
#: a model folder written as GGUF, and checked by loading it back
GGUF_EXPORT = "trainer.engine.gguf_export"
#: an evaluation (HumanEval, test loss, a checker): in the foreground or detached
EVALUATE = "trainer.engine.evaluate"
#: the CPU decode kernel's build and measurement
DECODE_KERNEL_BUILD = "trainer.engine.decode_kernel"

ALL = (WORKER, TRAINING_BACKEND, GGUF_IMPORT, FUSE, GGUF_EXPORT, EVALUATE, DECODE_KERNEL_BUILD)


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs `module` with this interpreter."""
    return [sys.executable, "-m", module, *args]
