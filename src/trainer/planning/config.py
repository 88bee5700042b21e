"""The QLoRA run config, with the reference defaults (rank 16, alpha 32, 4-bit group 64, 16 LoRA layers)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError

#: bounds that keep a typo from becoming a run that never ends or a path that is not one
MAX_ITERS = 10_000_000
MAX_PATH = 4096
#: layers, blocks, examples per step: beyond any model or machine (the preflight checks the real limits)
MAX_BLOCKS = 100_000


class QLoRAConfig(BaseModel):
    """One fine-tuning run."""

    # the field descriptions are also the MCP tool's argument docs (short: they are in every conversation)

    # floats must be finite: an infinite learning rate trains an adapter of NaNs
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PATH,
            description="Model folder, .gguf file or hub repo id.",
        ),
    ]
    data: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PATH,
            description="Folder of train.jsonl (and valid.jsonl); sft: messages, prompt/completion or text.",
        ),
    ]
    adapter_dir: Annotated[
        str | None,
        Field(max_length=MAX_PATH, description="Default: <run folder>/adapters."),
    ] = None
    rank: Annotated[int, Field(ge=1, le=512, description="LoRA rank.")] = 16
    alpha: Annotated[float, Field(gt=0, le=1e5, description="LoRA alpha (scale alpha / rank).")] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1, description="LoRA dropout.")] = 0.0
    num_layers: Annotated[int, Field(ge=-1, le=MAX_BLOCKS, description="Last blocks given LoRA; -1: all.")] = 16
    quantize_bits: Annotated[
        Literal[0, 4, 8],
        Field(description="Bits for a float base (0: plain LoRA)."),
    ] = 4
    group_size: Annotated[Literal[32, 64, 128], Field(description="Quantization group size.")] = 64
    iters: Annotated[int, Field(ge=1, le=MAX_ITERS, description="Optimizer steps.")] = 100
    batch_size: Annotated[int, Field(ge=1, le=MAX_BLOCKS, description="Examples per step.")] = 4
    learning_rate: Annotated[float, Field(gt=0, le=1, description="Adam learning rate.")] = 1e-5
    max_seq_length: Annotated[int, Field(ge=8, le=1 << 20, description="Longer examples are cut.")] = 2048
    grad_checkpoint: Annotated[bool, Field(description="Recompute activations: less memory.")] = False
    checkpoint_blocks: Annotated[
        int | None,
        Field(ge=1, le=MAX_BLOCKS, description="Blocks grad_checkpoint recomputes; default all."),
    ] = None
    pass_tokens: Annotated[
        int | None,
        Field(ge=8, le=1 << 24, description="Most tokens per pass (gradient accumulation)."),
    ] = None
    mask_prompt: Annotated[bool, Field(description="Loss on completions only.")] = False
    packing: Annotated[bool, Field(description="Pack records in rows, each seeing only itself.")] = False
    mode: Annotated[
        Literal["sft", "dpo", "orpo", "grpo"],
        Field(description="dpo/orpo: {prompt, chosen, rejected}; grpo: {prompt, tests}."),
    ] = "sft"
    beta: Annotated[float, Field(gt=0, le=100, description="KL (dpo, grpo) or odds-ratio (orpo) weight.")] = 0.1
    generations: Annotated[int, Field(ge=2, le=64, description="grpo: completions per prompt.")] = 4
    completion_tokens: Annotated[int, Field(ge=1, le=1 << 15, description="grpo: most tokens per completion.")] = 256
    format_reward: Annotated[float, Field(ge=0, le=1, description="grpo: bonus for a fenced code block.")] = 0.0
    temperature: Annotated[float, Field(gt=0, le=2, description="grpo: sampling temperature.")] = 1.0
    seed: Annotated[int, Field(ge=0, lt=1 << 32, description="LoRA init, batch order.")] = 0
    steps_per_report: Annotated[int, Field(ge=1, le=MAX_ITERS, description="Steps per train-loss report.")] = 10
    steps_per_eval: Annotated[int, Field(ge=1, le=MAX_ITERS, description="Steps per validation loss.")] = 200
    val_batches: Annotated[int, Field(ge=-1, le=MAX_ITERS, description="Validation batches; -1: all.")] = 25
    save_every: Annotated[int, Field(ge=1, le=MAX_ITERS, description="Steps per checkpoint.")] = 100
    fast_path: Annotated[
        bool | None,
        Field(description="Our kernels; null: on except on Metal."),
    ] = None
    dense_weights: Annotated[
        bool | None,
        Field(description="CPU: float32 frozen weights, faster; null: if small."),
    ] = None
    chunked_loss: Annotated[
        bool,
        Field(description="Loss in chunks: less memory, large vocabularies."),
    ] = False
    layerwise: Annotated[
        bool,
        Field(description="One block at a time: the least memory."),
    ] = False
    memory_budget_gb: Annotated[
        float | None,
        Field(
            gt=0,
            le=1e6,
            description="Peak GB per process (default: the server's); enforced.",
        ),
    ] = None
    allow_over_budget: Annotated[bool, Field(description="Start though predicted over budget.")] = False
    fit_to_budget: Annotated[
        bool,
        Field(description="Change settings to fit the budget."),
    ] = False
    num_processes: Annotated[
        int,
        Field(ge=1, le=64, description="Data-parallel processes sharing batch_size."),
    ] = 1
    backend: Annotated[
        Literal["auto", "ring", "nccl"],
        Field(description="auto: nccl on CUDA, else ring."),
    ] = "auto"
    hosts: Annotated[
        str | None,
        Field(max_length=MAX_PATH, description="mlx.launch hostfile (SSH); this host first."),
    ] = None
    memory_sample_interval: Annotated[
        float | None,
        Field(ge=0.05, le=60, description="Seconds per memory sample; default 0.5."),
    ] = None

    @model_validator(mode="after")
    def _nonzero_layers(self) -> QLoRAConfig:
        if self.num_layers == 0:
            raise ValueError("num_layers is 0, so nothing would train; use a positive number or -1 for all layers")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> QLoRAConfig:
        if self.batch_size % self.num_processes:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over num_processes {self.num_processes}; use a multiple "
                f"of {self.num_processes}"
            )
        return self

    @model_validator(mode="after")
    def _passes_are_for_the_fused_step(self) -> QLoRAConfig:
        if self.pass_tokens is not None and self.layerwise:
            raise ValueError("pass_tokens with layerwise=true: the layerwise step takes the whole batch; drop one")
        return self

    @model_validator(mode="after")
    def _packing_is_for_one_process_of_the_fused_step(self) -> QLoRAConfig:
        if self.packing and self.layerwise:
            raise ValueError("packing with layerwise=true: the layerwise step has no packed form; drop one")
        if self.packing and self.num_processes > 1:
            raise ValueError("packing with num_processes > 1 is not built; drop packing or use one process")
        return self

    @model_validator(mode="after")
    def _preference_modes_take_the_plain_step(self) -> QLoRAConfig:
        if self.mode != "sft":
            used = [name for name in ("layerwise", "chunked_loss", "pass_tokens", "packing") if getattr(self, name)]
            if used:
                raise ValueError(
                    f"mode {self.mode!r} computes its own loss over each example in one pass, so {' and '.join(used)} "
                    "cannot apply; drop it (grad_checkpoint saves memory in this mode)"
                )
        return self

    @property
    def preference(self) -> bool:
        """A mode trained on {prompt, chosen, rejected} pairs."""
        return self.mode in ("dpo", "orpo")

    @property
    def own_loss(self) -> bool:
        """A mode whose loss takes each example whole in one pass (no passes, chunks or layerwise)."""
        return self.mode != "sft"

    @property
    def rows_per_example(self) -> int:
        """Sequences a step runs per example: a pair's two replies, a grpo prompt's completions."""
        return {"sft": 1, "grpo": self.generations}.get(self.mode, 2)

    @property
    def per_process_batch(self) -> int:
        """Examples each process takes of a step's batch (the global batch is `batch_size`)."""
        return self.batch_size // self.num_processes

    @property
    def distributed(self) -> bool:
        """Whether the run starts an MLX process group (one process asking for NCCL is a group of one)."""
        return self.num_processes > 1 or self.backend == "nccl" or self.hosts is not None

    @property
    def recomputed_blocks(self) -> int:
        """LoRA blocks recomputed in the backward pass (0: none)."""
        if not self.grad_checkpoint or self.layerwise:
            return 0
        return self.checkpoint_blocks or 1 << 20

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> QLoRAConfig:
        """Validate a raw dict, turning pydantic's errors into one ConfigError that names each bad field."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError, within: str = "") -> str:
    """Pydantic's errors as this project's one-line message: each bad field, what is wrong and the value given.

    `within`: the argument that holds a run config (its errors read exactly as the CLI's); other fields are listed
    as invalid arguments."""
    config_parts: list[str] = []
    other_parts: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        in_config = not within or (loc[:1] == [within])
        where = ".".join(loc[1:] if within and in_config else loc) or (within or "config")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {_short(value)})"
        (config_parts if in_config else other_parts).append(f"{where}: {err['msg']}{shown}")
    parts = []
    if config_parts:
        parts.append("invalid run config: " + "; ".join(config_parts))
    if other_parts:
        parts.append("invalid arguments: " + "; ".join(other_parts))
    return "; ".join(parts)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
