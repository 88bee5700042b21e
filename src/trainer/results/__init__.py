"""From a run to a result: the fused model and its GGUF file (exports.py). The MLX work runs in child processes
(engine/fuse.py, engine/gguf_export.py), so this layer imports no MLX."""
