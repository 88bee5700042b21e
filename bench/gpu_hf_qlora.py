"""The peer stack on the same job: Hugging Face transformers + PEFT + bitsandbytes NF4 QLoRA of the
Qwen2.5-Coder-7B shape (random weights, random tokens, LoRA rank 16 / alpha 32 on the last 16 layers' seven
projections, Adam, bfloat16 compute). Prints one JSON line per size: tokens/s (best and mean of the timed steps) and
torch's peak memory.

python3 bench/gpu_hf_qlora.py [--only 1x512,1x2048,4x1024]   (needs torch, transformers, peft, bitsandbytes)
python3 bench/gpu_hf_qlora.py --chat DATA --tokenizer MODEL [--checkpointing] [--steps 32]
    the chat records of bench/gpu_plans.py, tokenized with the model folder's tokenizer and chat template as MLX-LM
    tokenizes them, in batches of 4 neighbours in length order padded to their longest (as MLX-LM batches), loss on
    the assistant's tokens only (mask_prompt); tokens/s counts those tokens, as the product does
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

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


def with_lora(model: torch.nn.Module) -> tuple[Any, torch.optim.Optimizer]:
    """LoRA rank 16 / alpha 32 on the last 16 blocks' seven projections, in training mode, and its Adam."""
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, layers_to_transform=list(range(12, 28))
        ),
    )
    peft_model.train()
    return peft_model, torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)


def run(model: torch.nn.Module, batch: int, seq: int, steps: int = 10) -> dict[str, float]:
    peft_model, opt = with_lora(model)
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


def token_ids(encoded: Any) -> list[int]:
    """transformers 5 answers apply_chat_template(tokenize=True) with a BatchEncoding, 4.x with the ids."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def chat_batches(data: str, tokenizer_dir: str, batch: int = 4) -> list[Any]:
    """(input ids, attention mask, labels with the prompt and padding at -100, trained tokens) per batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = []
    with open(f"{data}/train.jsonl", encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            ids = token_ids(tokenizer.apply_chat_template(messages, tokenize=True))[:2048]
            asked = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
            prompt = len(token_ids(asked))
            records.append((ids, prompt))
    records.sort(key=lambda r: len(r[0]))
    out = []
    for i in range(0, len(records) - batch + 1, batch):
        group = records[i : i + batch]
        width = max(len(ids) for ids, _ in group)
        x = torch.zeros((batch, width), dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for row, (ids, prompt) in enumerate(group):
            x[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, prompt : len(ids)] = torch.tensor(ids[prompt:])
        trained = int((labels[:, 1:] != -100).sum())
        out.append((x.cuda(), attention.cuda(), labels.cuda(), trained))
    return out


def run_chat(model: torch.nn.Module, batches: list[Any], checkpointing: bool, steps: int) -> dict[str, Any]:
    """Every batch in turn (two warm-up steps first), the attention mask from the padding."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model, opt = with_lora(model)
    torch.cuda.reset_peak_memory_stats()
    tokens, seconds = 0, 0.0
    for i in range(steps + 2):
        x, attention, labels, trained = batches[i % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(input_ids=x, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            tokens, seconds = tokens + trained, seconds + time.perf_counter() - start
    return {
        "tok_s": round(tokens / seconds, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "checkpointing": checkpointing,
        "checkpointing_active": bool(getattr(model, "is_gradient_checkpointing", False)),
        "attention": getattr(model.config, "_attn_implementation", None),
        "steps": steps,
        "loss": float(loss.item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="1x512,1x2048,4x1024")
    parser.add_argument("--chat", default=None, help="a folder of chat records (bench/gpu_plans.py's)")
    parser.add_argument("--tokenizer", default=None, help="with --chat: the model folder whose tokenizer to use")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    model = build()
    if args.chat:
        batches = chat_batches(args.chat, args.tokenizer)
        got = run_chat(model, batches, args.checkpointing, args.steps)
        print(json.dumps({"data": "chat", "who": "HF transformers + PEFT + bitsandbytes NF4", **got}), flush=True)
        return
    for size in args.only.split(","):
        batch, seq = (int(v) for v in size.split("x"))
        print(
            json.dumps({"size": size, "who": "HF transformers + PEFT + bitsandbytes NF4", **run(model, batch, seq)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
