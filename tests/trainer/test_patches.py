"""What engine/patches.py relies on in mlx and mlx-lm, pinned: an upgrade that moves any of it fails here, not as a
silent change of behaviour (a slower run, a wrong gradient, a checkpoint that leaks between models)."""

from __future__ import annotations

import inspect

import pytest
from mlx.nn.layers.dropout import Dropout
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import RMSNorm
from mlx_lm.models import llama, qwen2
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.engine import patches
from trainer.engine.tiny import TINY_ARGS


def test_the_model_modules_call_the_activations_we_rebind_by_module_name() -> None:
    for module in (qwen2, llama):
        source = inspect.getsource(module)
        for name in patches.ACTIVATION_PATCHES:
            assert hasattr(module, name), (module.__name__, name)
            assert f"{name}(" in source, (module.__name__, name)  # called through the module's global


def test_dropout_keeps_its_keep_probability_where_we_read_it() -> None:
    assert patches.dropout_keep_probability(Dropout(0.25)) == pytest.approx(0.75)
    assert patches.dropout_keep_probability(Dropout(0.0)) == 1.0
    assert patches.dropout_keep_probability(Linear(2, 2)) == 1.0


def test_checkpointed_blocks_swap_only_the_chosen_trained_blocks_and_restore_them() -> None:
    model = qwen2.Model(qwen2.ModelArgs(**{**TINY_ARGS, "vocab_size": 64}))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    block = type(model.layers[0])
    with patches.checkpointed_blocks(model, 1) as chosen:
        kinds = [type(layer) for layer in model.layers]
        assert chosen == 1 and kinds.count(block) == len(model.layers) - 1  # one of the two LoRA blocks
        assert kinds[-2] is not block and issubclass(kinds[-2], block)
    assert all(type(layer) is block for layer in model.layers)  # nothing outlives the run
    assert block.__call__ is qwen2.TransformerBlock.__call__  # the class itself never changed


def test_a_class_swap_only_ever_narrows_to_a_subclass() -> None:
    class Ours(Linear):
        pass

    layer = Linear(2, 2)
    patches.swap_class(layer, Ours)
    assert type(layer) is Ours
    with pytest.raises(TypeError, match="does not extend"):
        patches.swap_class(RMSNorm(2), Ours)
    lora = LoRALinear.from_base(Linear(4, 4), r=2)
    assert {"lora_a", "lora_b", "linear"} <= set(lora.keys())  # lora_math reads these names
