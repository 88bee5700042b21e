"""CPU side by side in one run: QLoRA training tokens/s and peak memory, ours vs plain MLX-LM (as installed: the
wheel's reference BLAS, MLX's quantized kernels) vs PyTorch CPU + PEFT (float32, optional); then decode tokens/s of
the real SmolLM2-135M-Instruct, ours vs plain MLX-LM (vs llama.cpp on the same GGUF, optional).

uv run python bench/cpu_qlora.py [--torch-python /path/to/venv/bin/python] [--llama-python /path/to/python]
    [--blis /usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3] [--repeats 3] [--out results.jsonl]
(a PyTorch venv: python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 peft transformers;
 a llama.cpp one: python3 -m venv /tmp/llv && /tmp/llv/bin/pip install llama-cpp-python, built here from source)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from cpu_decode_shape import decode_shape  # noqa: E402
from memory_prediction import SHAPES, measure  # noqa: E402
from memory_prediction import report as report_row  # noqa: E402

from trainer.environment.preload import preload_env  # noqa: E402
from trainer.planning.memory_plan import dense_fits  # noqa: E402
from trainer.settings import default_budget_gb  # noqa: E402

TORCH_CHILD = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
dims, B, T = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = LlamaConfig(**dims, max_position_embeddings=8192, rope_theta=100000.0)
m = LlamaForCausalLM(cfg).float()
first = dims["num_hidden_layers"] - 16
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                 layers_to_transform=list(range(first, dims["num_hidden_layers"]))))
opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-5)
x = torch.randint(0, dims["vocab_size"], (B, T))
def step():
    out = m(input_ids=x, labels=x); out.loss.backward(); opt.step(); opt.zero_grad()
step()
times = []
for _ in range(3):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"tok_s": B * T / min(times), "threads": torch.get_num_threads()}))
"""

DECODE_CHILD = r"""
import json, sys
from mcp_local_demo.bundled import smollm2_gguf
from trainer.engine.inference import ModelSession
session = ModelSession(fast_path=sys.argv[1] == "1")
session.load(str(smollm2_gguf()))
prompt = "Write a Python function is_even(n) that returns True when n is even."
session.generate(prompt, max_tokens=16)
g = session.generate(prompt, max_tokens=96)
print(json.dumps({"decode_tok_s": g.tokens_per_second, "prefill_tok_s": g.prompt_tokens_per_second,
                  "tokens": g.generation_tokens, "peak_gb": g.peak_memory_gb, "text_start": g.text[:40]}))
"""

LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_ctx=1024, verbose=False)
messages = [{"role": "user", "content": "Write a Python function is_even(n) that returns True when n is even."}]
def run(n):
    stamps = []
    for _ in llm.create_chat_completion(messages, max_tokens=n, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
    return stamps
run(16)
stamps = run(96)
print(json.dumps({"decode_tok_s": (len(stamps) - 2) / (stamps[-1] - stamps[1]), "chunks": len(stamps)}))
"""


TORCH = "PyTorch CPU + PEFT (float32)"


def torch_run(python: str, shape: str, batch: int, seq: int) -> dict[str, Any]:
    # PyTorch as installed: our preloads (OpenBLAS, tcmalloc) halve its speed here (123-160 against 240-296 tokens/s)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    child = [python, "-c", TORCH_CHILD, json.dumps(SHAPES[shape]), str(batch), str(seq)]
    out = subprocess.run(child, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr[-300:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MCP_LOCAL_BLAS"] = env["MCP_LOCAL_MALLOC"] = "off"
    return env


def ours_env() -> dict[str, str]:
    """What our workers run with: OpenBLAS and tcmalloc preloaded."""
    return preload_env(dict(os.environ))


def ours_variants() -> list[tuple[str, dict[str, str]]]:
    """Ours as this machine is set up, and, where its environment pins OpenBLAS's kernels (OPENBLAS_CORETYPE), with
    OpenBLAS choosing them itself."""
    variants = [("ours", ours_env())]
    if "OPENBLAS_CORETYPE" in os.environ:
        unpinned = {k: v for k, v in ours_env().items() if k != "OPENBLAS_CORETYPE"}
        variants.append(("ours, OPENBLAS_CORETYPE unset", unpinned))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python, for its decode")
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b")
    parser.add_argument("--size", default="4x64")
    parser.add_argument("--no-train", action="store_true", help="decode only")
    parser.add_argument("--blis", default=None, help="a BLIS libblas.so.3, for a decode row with it preloaded")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of ours and PyTorch per shape")
    parser.add_argument("--decode-shapes", default="qwen2.5-0.5b", help="random-weight shapes to decode too")
    args = parser.parse_args()
    batch, seq = (int(v) for v in args.size.split("x"))

    def report(row: dict[str, Any]) -> None:
        report_row(row, args.out)

    for shape in [] if args.no_train else args.shapes.split(","):
        case = {"shape": shape, "batch": batch, "seq": seq, "ckpt": False, "chunked": False}
        report({"shape": shape, "size": args.size, "who": "plain MLX-LM", **measure(case, False, 1, plain_env())})
        # ours as a run would get it: dense_weights on where the product turns it on by itself
        dims = dict(SHAPES[shape], model_type="qwen2", quantization={"group_size": 64, "bits": 4})
        ours = {**case, "dense": dense_fits(dims, default_budget_gb())}
        best: dict[str, float] = {}
        # this machine's speed drifts by 10-15% over minutes: ours and PyTorch alternate, each keeps its best run
        for repeat in range(args.repeats):
            for who, env in ours_variants():
                row = {"shape": shape, "size": args.size, "who": who, "repeat": repeat, **ours}
                row.update(measure(ours, None, 3, env))
                report(row)
                best[who] = max(best.get(who, 0.0), float(row.get("tok_s", 0.0)))
            if args.torch_python:
                got = torch_run(args.torch_python, shape, batch, seq)
                report({"shape": shape, "size": args.size, "who": TORCH, "repeat": repeat, **got})
                best[TORCH] = max(best.get(TORCH, 0.0), float(got.get("tok_s", 0.0)))
        report({"shape": shape, "size": args.size, "best_tok_s": best, "repeats": args.repeats})
    decoders = [("plain MLX-LM", "0", plain_env()), *((who, "1", env) for who, env in ours_variants())]
    # what decode did before the kernel: float32 weight copies through OpenBLAS's one-row products
    decoders.append(("ours, decode kernel off", "1", {**ours_env(), "MCP_LOCAL_DECODE_KERNEL": "off"}))
    if args.blis:  # BLIS's one-row products are faster than OpenBLAS's here (its multi-row GEMMs slower)
        blis_env = preload_env({**os.environ, "MCP_LOCAL_BLAS": args.blis, "BLIS_NUM_THREADS": "2"})
        decoders.append(("ours, BLIS instead of OpenBLAS", "1", blis_env))
    for who, fast, env in decoders:
        out = subprocess.run([sys.executable, "-c", DECODE_CHILD, fast], capture_output=True, text=True, env=env)
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
        report({"decode": "SmolLM2-135M-Instruct Q4_1", "who": who, **got})
    for shape in args.decode_shapes.split(",") if args.decode_shapes else []:
        for who, fast, env in decoders:
            report({"decode": f"{shape} shape, random 4-bit weights", "who": who, **decode_shape(shape, fast, env)})
    if args.llama_python:
        from mcp_local_demo.bundled import smollm2_gguf

        out = subprocess.run(
            [args.llama_python, "-c", LLAMA_CHILD, str(smollm2_gguf())], capture_output=True, text=True
        )
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
        report({"decode": "SmolLM2-135M-Instruct Q4_1", "who": "llama.cpp (llama-cpp-python, 2 threads)", **got})


if __name__ == "__main__":
    main()
