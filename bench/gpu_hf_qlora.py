"""The peer stack on the same job: Hugging Face transformers + PEFT + bitsandbytes NF4 QLoRA of the
Qwen2.5-Coder-7B shape (random weights, random tokens, LoRA rank 16 / alpha 32 on the last 16 layers' seven
projections, Adam, bfloat16 compute). Prints one JSON line per size: tokens/s (best and mean of the timed steps) and
torch's peak memory.

python3 bench/gpu_hf_qlora.py [--only 1x512,1x2048,4x1024]   (needs torch, transformers, peft, bitsandbytes)
"""

from __future__ import annotations

import argparse
import json
import time

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

DIMS = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "vocab_size": 152064,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**DIMS)).to(torch.bfloat16)
    for layer in model.model.layers:  # every block projection becomes NF4, quantized from its random weights
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name not in PROJECTIONS:
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    device="cpu",
                )
                q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
                setattr(parent, name, q.cuda())
    for p in model.parameters():
        p.requires_grad_(False)
    torch.cuda.empty_cache()
    return model


def run(model: torch.nn.Module, batch: int, seq: int, steps: int = 10) -> dict[str, float]:
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, layers_to_transform=list(range(12, 28))
        ),
    )
    peft_model.train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, DIMS["vocab_size"], (batch, seq), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    result = {
        "tok_s": batch * seq / min(times),
        "tok_s_mean": batch * seq * len(times) / sum(times),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "loss": float(loss.item()),
    }
    peft_model.unload()  # back to the bare quantized model for the next size
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="1x512,1x2048,4x1024")
    args = parser.parse_args()
    model = build()
    for size in args.only.split(","):
        batch, seq = (int(v) for v in size.split("x"))
        print(
            json.dumps({"size": size, "who": "HF transformers + PEFT + bitsandbytes NF4", **run(model, batch, seq)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
