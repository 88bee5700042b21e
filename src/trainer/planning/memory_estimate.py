"""Predicting a QLoRA run's peak memory from the model's config and the run's settings alone (no weights loaded).

The peak is the sum of parts: quantized weights, LoRA parameters with their gradients and Adam state, the
activations the backward pass keeps, the logits and loss, and allocator slack. Activation and logit terms count
tensors per token (hidden-, kv- and intermediate-sized, and vocabulary-sized); their coefficients were calibrated
against measured peaks (bench/memory_prediction.py, docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

GB = 1e9

#: tensors kept per token and LoRA layer, in units of hidden / kv / intermediate width; structural counts (10, 4, 6)
#: scaled by 0.82, the least-squares fit to the CPU grid of bench/memory_prediction.py
ACT_HIDDEN = 8.2
ACT_KV = 3.3
ACT_INTERMEDIATE = 4.9
#: attention probabilities kept per layer for the backward pass, in units of heads x T x T: MLX's attention (same
#: fit), and the CPU fast path's (engine/cpu_math.py; fit with the CPU terms below, docs/benchmarks.md)
ACT_ATTENTION = 0.82
ACT_ATTENTION_CPU_FAST = 0.32
#: vocabulary-sized tensors alive at the loss: the logits plus float32 log-softmax, gradients and copies (fit: 4.8);
#: the CPU fast path's cross-entropy recomputes its softmax in pieces instead (fit: 3.05)
LOGIT_TENSORS = 4.8
LOGIT_TENSORS_CPU_FAST = 3.05
#: the same in the layerwise step's loss chunks, run eagerly one at a time (fit: SmolLM2 and Qwen2.5-0.5B shapes)
LAYERWISE_LOGIT_TENSORS_CPU_FAST = 2.35
#: with the chunked loss the head's logits are recomputed, not kept: part of a float32 tensor fewer (fit)
CHUNKED_LOGIT_SAVING = 0.4
#: gradient checkpointing: the recomputed layer's activations and its backward intermediates, in layers (fit)
CHECKPOINT_LAYERS = 0.22
#: a CPU step's fixed overhead: MLX's compiled kernels, small arrays and scratch (fit)
CPU_OVERHEAD_GB = 0.07
#: fraction added for the allocator's fragmentation and cache
SLACK = 0.02
#: CUDA, as our workers run it (8 operations per command buffer, environment/mlx_env.py; LoRA in half precision,
#: engine/lora_math.py), fit to the 7B shape on an H200: the peak is linear in batch x length whatever the split, so
#: attention runs fused and keeps no T x T probabilities; per-token tensors are a share of the CPU's (0.93 with
#: MLX-LM's float32 LoRA); a one-graph step adds a fixed amount and, with the fast path, the head's and a few
#: blocks' dequantized weights (docs/benchmarks.md)
GPU_TOKEN_SCALE = 0.70
GPU_OVERHEAD_GB = 0.9
FAST_GPU_BLOCKS = 3
#: CUDA, layerwise step: one block's forward and backward, in layers of activations, with the next block handed to the
#: GPU while this one runs (batches up to engine.layerwise.PIPELINE_MAX_TOKENS) and without (fit to the 7B shape on
#: an H200, docs/benchmarks.md); its loss chunks hold the head's dequantized weight and one chunk's logits, nothing
#: that scales like the CPU's float32 softmax
GPU_LAYERWISE_BLOCK_LAYERS_PIPELINED = 6.1
GPU_LAYERWISE_BLOCK_LAYERS = 4.2
LAYERWISE_PIPELINE_MAX_TOKENS = 2048
#: tokens of one loss chunk in the layerwise step (trainer.layerwise.LOSS_CHUNK_TOKENS)
LAYERWISE_LOSS_TOKENS = 512
#: CUDA, the fused loss (engine/fused_loss.py): the share of the plain loss's logits term its peak still holds. Per
#: chunk it keeps one chunk's logits, but buffers return only as the GPU finishes with them: with MLX's default limit
#: it saved 5.8 GB of a predicted 15.0 (7B shape, packed 4 x 2,048, 9 recomputed blocks: 24.21 GB measured on an
#: H100); with the run's budget as MLX's limit (engine/memory_limit.py, 16 GB) 20.53 GB with 9 blocks and 18.66 with
#: 10 (docs/benchmarks.md)
GPU_FUSED_LOGITS_KEPT = 0.62
GPU_FUSED_LOGITS_KEPT_LIMITED = 0.38
#: GPU: MLX's limit sits this far under the run's budget, because a step held at the limit passes it by what is
#: allocated between two of eval's checks, which grows with the pass's tokens: 1.09 GB at 8,192 (packed 4 x 2,048, 12
#: recomputed blocks, limit 15.5: 16.59 GB from step 7, on an H200 and an H100; its first 3 steps 0.2-0.3 over), under
#: 0.27 at 2,048 (1 x 2,048: 15.56 under a 15.5 limit, 15.85 under 16; docs/benchmarks.md)
MLX_LIMIT_MARGIN_GB = 0.5
MLX_LIMIT_OVERSHOOT_GB_PER_TOKEN = 1.09 / 8192


def mlx_limit_gb(budget_gb: float) -> float:
    """MLX's memory limit for a GPU run with this budget (engine/memory_limit.py)."""
    return max(budget_gb / 2, budget_gb - MLX_LIMIT_MARGIN_GB)


#: CUDA: what recomputing one block frees, in layers of activations: 0.45 GB a block at 1x2048 on the 7B shape
#: (measured 17.68 GB with none, 15.89 with 4, 10.42 with all 16; H100, docs/benchmarks.md)
GPU_RECOMPUTE_FREED_LAYERS = 1.28


class MemoryParts(BaseModel):
    """Predicted peak memory of a training run, in GB, part by part."""

    weights_gb: float = Field(description="The base model's (quantized) weights.")
    lora_gb: float = Field(description="LoRA parameters, their gradients and Adam's two moments.")
    activations_gb: float = Field(description="Activations kept for the backward pass.")
    logits_gb: float = Field(description="Logits, log-softmax and their gradient at the loss.")
    slack_gb: float = Field(description="Allocator slack.")
    total_gb: float = Field(description="Predicted peak.")


class MemoryPlan(BaseModel):
    """The settings a prediction was made for."""

    batch_size: int
    seq_len: int
    num_layers: int
    rank: int
    grad_checkpoint: bool
    chunked_loss: bool
    quantize_bits: int
    compute_bytes: int = Field(description="2 for bfloat16/float16 (GPU), 4 for float32 (our CPU path).")
    device: str = Field("cpu", description="'cpu' or 'gpu' (MLX's default device).")
    fast_path: bool = Field(False, description="Whether the dequantize-then-GEMM path is on.")
    dense_weights: bool = Field(False, description="CPU: float32 copies of the frozen weights are kept.")
    layerwise: bool = Field(False, description="The step is evaluated one block at a time.")
    recomputed_blocks: int = Field(0, description="LoRA blocks recomputed in the backward pass.")
    pass_tokens: int | None = Field(None, description="Most tokens per pass (gradient accumulation); None: the batch.")
    packed: bool = Field(False, description="Rows of packed records: a block-diagonal attention mask per pass.")
    memory_limit_gb: float | None = Field(None, description="GPU: MLX's memory limit, from the run's budget.")

    @property
    def pass_batch(self) -> float:
        """Examples of seq_len tokens in the largest pass (at least one: an example is never split)."""
        if self.pass_tokens is None:
            return self.batch_size
        return min(self.batch_size, max(1, self.pass_tokens // self.seq_len))


def _dims(config: dict[str, Any]) -> tuple[int, int, int, int, int, int, int, bool]:
    text = config.get("text_config", config)
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads", heads))
    head_dim = int(text.get("head_dim") or hidden // heads)
    return (
        hidden,
        int(text["intermediate_size"]),
        int(text["num_hidden_layers"]),
        heads,
        kv_heads * head_dim,
        int(text["vocab_size"]),
        head_dim,
        bool(text.get("tie_word_embeddings", False)),
    )


def _weight_bytes(rows: int, cols: int, bits: int, group_size: int, scale_bytes: int, dense_bytes: int) -> float:
    if not bits:
        return rows * cols * dense_bytes
    return rows * cols * bits / 8 + rows * (cols / group_size) * 2 * scale_bytes


def dense_copy_bytes(model_config: dict[str, Any]) -> float:
    """Float32 copies of every quantized weight (the `dense_weights` option)."""
    hidden, inter, layers, heads, kv, vocab, head_dim, tied = _dims(model_config)
    per_layer = 2 * heads * head_dim * hidden + 2 * kv * hidden + 3 * inter * hidden
    return float((layers * per_layer + vocab * hidden * (1 if tied else 2)) * 4)


def _layerwise_phases(
    plan: MemoryPlan, tokens: int, vocab: int, per_layer: float, logit_tensors: float, dense: tuple[float, float]
) -> tuple[float, float]:
    """The layerwise step's two phases, which never overlap (on top of each LoRA block's kept input): the loss, one
    512-token chunk at a time (with the fast path on a GPU, the head's dequantized weight too), and one block's
    forward and backward (with that block's dequantized weights). Returns (activations, logits): the larger phase in
    its own part, the other 0."""
    d = plan.compute_bytes
    dense_block, dense_head = dense
    cpu_fast = plan.device == "cpu" and plan.fast_path
    # each chunk's loss is differentiated directly (nothing recomputed): all its logit tensors are alive
    chunk_tokens = min(tokens, LAYERWISE_LOSS_TOKENS)
    if plan.device == "cpu":
        chunk_tensors = LAYERWISE_LOGIT_TENSORS_CPU_FAST if cpu_fast else logit_tensors
        loss_phase = chunk_tokens * vocab * (d + 4 * (chunk_tensors - 1))
        block_layers = CHECKPOINT_LAYERS
    else:
        loss_phase = chunk_tokens * vocab * d + dense_head
        pipelined = tokens <= LAYERWISE_PIPELINE_MAX_TOKENS
        block_layers = GPU_LAYERWISE_BLOCK_LAYERS_PIPELINED if pipelined else GPU_LAYERWISE_BLOCK_LAYERS
    block_phase = block_layers * per_layer + dense_block
    return (block_phase if block_phase > loss_phase else 0.0), (loss_phase if loss_phase >= block_phase else 0.0)


def predict_peak(model_config: dict[str, Any], plan: MemoryPlan) -> MemoryParts:
    """The peak; on a GPU, where MLX's limit binds, the peak held at the limit (dead buffers returned first), never
    below what the step itself holds, with a fused loss's share under the limit."""
    free = _peak(model_config, plan, limited=False)
    limit = plan.memory_limit_gb
    if limit is None or free.total_gb <= limit:
        return free
    held = _peak(model_config, plan, limited=True)
    tokens = plan.pass_batch * plan.seq_len
    at_limit = min(free.total_gb, limit + MLX_LIMIT_OVERSHOOT_GB_PER_TOKEN * tokens)
    if held.total_gb >= at_limit:
        return held
    return held.model_copy(update={"slack_gb": held.slack_gb + at_limit - held.total_gb, "total_gb": at_limit})


def _peak(model_config: dict[str, Any], plan: MemoryPlan, limited: bool) -> MemoryParts:
    hidden, inter, layers, heads, kv, vocab, head_dim, tied = _dims(model_config)
    quant = model_config.get("quantization") or {}
    bits = int(quant.get("bits", plan.quantize_bits))
    group = int(quant.get("group_size", 64))
    d = plan.compute_bytes
    projections = [(heads * head_dim, hidden), (kv, hidden), (kv, hidden), (hidden, heads * head_dim)]
    projections += [(inter, hidden), (inter, hidden), (hidden, inter)]

    weights = layers * sum(_weight_bytes(r, c, bits, group, d, d) for r, c in projections)
    weights += _weight_bytes(vocab, hidden, bits, group, d, d) * (1 if tied else 2)
    weights += (2 * layers + 1) * hidden * d  # norms
    if plan.dense_weights and plan.device == "cpu" and plan.fast_path and bits:
        weights += dense_copy_bytes(model_config)

    lora_layers = layers if plan.num_layers == -1 else min(plan.num_layers, layers)
    lora_params = lora_layers * sum(plan.rank * (r + c) for r, c in projections)
    lora = lora_params * 4 * 4  # float32 parameters, gradients, Adam m and v
    if plan.pass_tokens is not None and not plan.layerwise:  # accumulation: the running sum and a pass's weighted copy
        lora += lora_params * 4 * 2

    # On CUDA MLX's checkpointing and checkpointed loss chunks barely lowered the peak (docs/benchmarks.md): there
    # recomputed blocks are ours (engine/recompute.py), the chunked loss fused (engine/fused_loss.py), each measured
    recomputed = min(plan.recomputed_blocks, lora_layers)
    chunked = plan.chunked_loss and plan.device == "cpu"
    batch = plan.pass_batch
    tokens = int(batch * plan.seq_len)
    token_scale = 1.0 if plan.device == "cpu" else GPU_TOKEN_SCALE
    act_per_token = (ACT_HIDDEN * hidden + ACT_KV * kv + ACT_INTERMEDIATE * inter) * d * token_scale
    per_layer = tokens * act_per_token
    cpu_fast = plan.device == "cpu" and plan.fast_path
    if plan.device == "cpu":
        attention = ACT_ATTENTION_CPU_FAST if cpu_fast else ACT_ATTENTION
        per_layer += attention * batch * heads * plan.seq_len**2 * d
    gpu_fast = plan.device != "cpu" and plan.fast_path and bool(bits)
    # one block's and the head's weights, dequantized
    dense_block, dense_head = sum(r * c for r, c in projections) * d, vocab * hidden * d
    logit_tensors = LOGIT_TENSORS_CPU_FAST if cpu_fast else LOGIT_TENSORS
    kept = logit_tensors - (CHUNKED_LOGIT_SAVING if chunked else 0.0)
    if plan.layerwise:
        dense = (dense_block, dense_head) if gpu_fast else (0.0, 0.0)
        kept_inputs = lora_layers * tokens * hidden * d
        activations, logits = _layerwise_phases(plan, tokens, vocab, per_layer, logit_tensors, dense)
        activations += kept_inputs
        base = weights + lora + activations + logits
    else:
        activations = lora_layers * per_layer
        if recomputed and plan.device == "cpu":  # keep a recomputed block's input; recompute one at a time
            activations += recomputed * (tokens * hidden * d - per_layer) + CHECKPOINT_LAYERS * per_layer
        elif recomputed:
            activations -= recomputed * GPU_RECOMPUTE_FREED_LAYERS * per_layer
        logit_tokens = int(min(tokens, batch * 1024)) if chunked else tokens
        logits = logit_tokens * vocab * (d + 4 * (kept - 1)) * token_scale
        if plan.chunked_loss and plan.device != "cpu":  # fused: what its peak was measured to keep
            logits *= GPU_FUSED_LOGITS_KEPT_LIMITED if limited else GPU_FUSED_LOGITS_KEPT
        if plan.packed:  # the pass's mask: booleans on the CPU; additive, in the compute type, on a GPU
            activations += batch * plan.seq_len**2 * (1 if plan.device == "cpu" else d)
        base = weights + lora + activations + logits
        if plan.device == "cpu":
            activations += CPU_OVERHEAD_GB * GB
            base += CPU_OVERHEAD_GB * GB
        else:
            extra = GPU_OVERHEAD_GB * GB
            if gpu_fast:  # dequantized weights: the head's and a few blocks' at the peak
                extra += dense_head + FAST_GPU_BLOCKS * dense_block
            activations += extra
            base += extra
    slack = SLACK * base
    return MemoryParts(
        weights_gb=weights / GB,
        lora_gb=lora / GB,
        activations_gb=activations / GB,
        logits_gb=logits / GB,
        slack_gb=slack / GB,
        total_gb=(base + slack) / GB,
    )
