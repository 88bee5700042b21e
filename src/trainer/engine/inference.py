"""In-process model loading and generation (MLX-LM's `load` and `stream_generate`), with optional adapters.

One `ModelSession` keeps loaded models keyed by (model folder, adapter folder) so switching between a base model and
its fine-tuned adapter does not reload weights each time. Calls are serialised by a lock: MLX is not re-entrant.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, Field

from ..errors import ConfigError, ModelError
from ..lifecycle.memory import GB
from ..planning.modelref import read_model_config, resolve_adapter_dir, resolve_model_dir
from ..planning.paths import PathPolicy
from .mlx_import import require_mlx

MAX_CACHED = 3
#: the context assumed for bounding a prompt's bytes when the model's config does not give one
UNKNOWN_CONTEXT = 131072
DENSE_CACHE_MAX_BYTES = 2 * 1024**3


def dense_cache_budget() -> int:
    """Float32 weight copies speed up CPU prefill (and decode where our decode kernels could not be built); allow them
    up to 2 GB and a quarter of the free memory."""
    import psutil

    return min(DENSE_CACHE_MAX_BYTES, int(psutil.virtual_memory().available) // 4)


class ModelInfo(BaseModel):
    model: str
    adapter: str | None
    architecture: str
    parameters: int
    quantization: dict[str, Any] | None
    load_seconds: float
    memory_gb: float
    has_chat_template: bool
    decode_kernel_layers: int = Field(
        0,
        description="Layers decoding through our CPU kernels (0: MLX's own operations; the log says why).",
    )


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    generation_tokens: int
    tokens_per_second: float
    prompt_tokens_per_second: float
    finish_reason: str | None
    peak_memory_gb: float


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    info: ModelInfo
    context: int | None = None  # the model's max_position_embeddings, when its config says
    max_token_bytes: int = 1024  # the longest vocabulary entry (_max_token_bytes)


def _prompt_bytes(prompt: str | None, messages: list[dict[str, str]] | None) -> int:
    if prompt is not None:
        return len(prompt.encode("utf-8", errors="replace"))
    return sum(len(str(m.get("content", "")).encode("utf-8", errors="replace")) for m in messages or [])


def _refuse_oversized(nbytes: int, loaded: _Loaded, max_tokens: int) -> None:
    """Before tokenizing: a prompt of more bytes than the context could hold at the vocabulary's longest token is
    over the context whatever it says; tokenizing megabytes first would take the server's memory and minutes."""
    context = loaded.context or UNKNOWN_CONTEXT
    most = (context - max_tokens) * loaded.max_token_bytes
    if nbytes > most:
        raise ConfigError(
            f"the prompt is {nbytes} bytes; the model's context of {context} tokens (less max_tokens "
            f"{max_tokens}) holds at most {max(most, 0)} bytes even at its vocabulary's longest token of "
            f"{loaded.max_token_bytes} bytes; shorten the prompt or lower max_tokens"
        )


def _check_context(tokens: int, context: int | None, max_tokens: int) -> None:
    """A prompt longer than the model's context would only fill memory; refuse it with the numbers."""
    if context is not None and tokens + max_tokens > context:
        raise ConfigError(
            f"the prompt is {tokens} tokens and max_tokens {max_tokens}, more than the model's context of {context} "
            "tokens (max_position_embeddings); shorten the prompt or lower max_tokens"
        )


def _prompt_ids(tokenizer: Any, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    """The prompt's tokens as `stream_generate` would make them, through the chat template when there is one."""
    chat = messages if messages is not None else [{"role": "user", "content": prompt or ""}]
    if getattr(tokenizer, "chat_template", None):
        text = str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    elif prompt is not None:
        text = prompt
    else:
        text = "\n".join(m["content"] for m in chat)
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def _max_token_bytes(tokenizer: Any) -> int:
    """The longest vocabulary entry in UTF-8 bytes: at least as many input bytes as any one token can stand for."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, TypeError, ValueError):
        return 1024
    return max((len(token.encode("utf-8")) for token in vocab), default=1024)


def _count_parameters(model: Any) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


class ModelSession:
    """Models loaded in this process for generation. MLX is imported on the first load, not before."""

    def __init__(
        self, fast_path: bool | None = None, models_root: Path | None = None, roots: tuple[Path, ...] | None = None
    ) -> None:
        self.fast_path = fast_path
        self.models_root = models_root  # where GGUF imports go
        self.paths = PathPolicy(roots)
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str | None], _Loaded] = {}
        self.current: tuple[str, str | None] | None = None

    def _key(self, model: str, adapter: str | None) -> tuple[str, str | None]:
        model_dir = resolve_model_dir(model, self.models_root, self.paths)
        read_model_config(model_dir)
        adapter_dir = resolve_adapter_dir(str(self.paths.check(Path(adapter), "adapter"))) if adapter else None
        return str(model_dir), str(adapter_dir) if adapter_dir else None

    def load(self, model: str, adapter: str | None = None) -> ModelInfo:
        """Load (or reuse) a model, optionally with an adapter, and make it the one plain `generate` uses."""
        require_mlx()
        key = self._key(model, adapter)
        with self._lock:
            loaded = self._loaded.get(key) or self._load(key)
            self.current = key
            return loaded.info

    def loaded(self, model: str, adapter: str | None = None) -> _Loaded:
        """The loaded model and tokenizer themselves (loading them if needed), for evaluation in this process."""
        require_mlx()
        key = self._key(model, adapter)
        with self._lock:
            return self._loaded.get(key) or self._load(key)

    def _load(self, key: tuple[str, str | None]) -> _Loaded:
        import mlx.core as mx
        from mlx_lm.utils import load

        model_dir, adapter_dir = key
        before = mx.get_active_memory()
        start = time.perf_counter()
        try:
            result = load(model_dir, adapter_path=adapter_dir, return_config=True)
            model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], result)
        except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"could not load model {model_dir!r}: {exc}") from exc
        except RuntimeError as exc:  # MLX's readers: damaged or foreign weight files
            raise ModelError(
                f"could not load model {model_dir!r}: {exc}; its weight files are damaged or not safetensors: copy or "
                "download the model again"
            ) from exc
        from .fastpath import apply_fast_path, cache_dense_weights

        if apply_fast_path(model, self.fast_path):
            cache_dense_weights(model, dense_cache_budget())
        mx.eval(model.parameters())
        info = ModelInfo(
            model=model_dir,
            adapter=adapter_dir,
            architecture=str(config.get("model_type", "unknown")),
            parameters=_count_parameters(model),
            quantization=config.get("quantization"),
            load_seconds=time.perf_counter() - start,
            memory_gb=(mx.get_active_memory() - before) / GB,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            decode_kernel_layers=sum(getattr(m, "_decode_kernel", None) is not None for _, m in model.named_modules()),
        )
        while len(self._loaded) >= MAX_CACHED:  # drop the oldest; MLX frees its arrays with it
            self._loaded.pop(next(iter(self._loaded)))
        context = config.get("max_position_embeddings")
        context = int(context) if isinstance(context, int) else None
        loaded = _Loaded(model, tokenizer, info, context, _max_token_bytes(tokenizer))
        self._loaded[key] = loaded
        return loaded

    def _current(self) -> tuple[str, str | None]:
        if self.current is None:
            raise ModelError("no model is loaded; call load_model with a model folder first")
        return self.current

    def loaded_models(self) -> list[ModelInfo]:
        return [loaded.info for loaded in self._loaded.values()]

    def generate(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        adapter: str | None = None,
        model: str | None = None,
        stop_when: Callable[[str], bool] | None = None,
    ) -> Generation:
        """Generate from the current model, or from `model` and/or `adapter` for this call only (the current model
        stays what load_model chose), through the model's chat template when it has one; `stop_when` ends it early
        (given the text so far, after each token)."""
        if (prompt is None) == (messages is None):
            raise ConfigError("pass exactly one of prompt (a string) or messages (a chat list)")
        key = self._key(model or self._current()[0], adapter) if adapter or model else None
        require_mlx()
        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from .patches import fast_activations

        with self._lock:
            key = key or self._current()
            loaded = self._loaded.get(key) or self._load(key)
        # measured and tokenized outside the lock: a huge prompt must not hold up every other call
        _refuse_oversized(_prompt_bytes(prompt, messages), loaded, max_tokens)
        ids = _prompt_ids(loaded.tokenizer, prompt, messages)
        _check_context(len(ids), loaded.context, max_tokens)
        with self._lock:
            if seed is not None:
                mx.random.seed(seed)
            mx.reset_peak_memory()
            pieces: list[str] = []
            last = None
            sampler = make_sampler(temp=temperature, top_p=top_p)
            with fast_activations(loaded.model):
                for last in stream_generate(
                    loaded.model, loaded.tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler
                ):
                    pieces.append(last.text)
                    if stop_when is not None and stop_when("".join(pieces)):
                        break
            if last is None:
                raise ModelError("generation produced nothing")
            return Generation(
                text="".join(pieces),
                prompt_tokens=last.prompt_tokens,
                generation_tokens=last.generation_tokens,
                tokens_per_second=last.generation_tps,
                prompt_tokens_per_second=last.prompt_tps,
                finish_reason=last.finish_reason,
                peak_memory_gb=mx.get_peak_memory() / GB,
            )
