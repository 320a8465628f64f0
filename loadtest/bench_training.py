"""Training throughput: loraplex's trainer against a plain PEFT loop, same data, one run.

Both fine-tune the default base model with the same LoRA settings, batch size, sequence
length and number of steps on the same chat examples; both count the non-padding tokens
they push through the model. loraplex's trainer adds assistant-only labels, a cosine
schedule, checkpoints and progress callbacks; the plain loop is the minimal PEFT recipe.

    .venv/bin/python loadtest/bench_training.py --steps 12 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.base_model import ensure_default_model  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402


def examples(n: int) -> list[dict]:
    topics = ["the sea", "mountains", "rivers", "bread", "the moon", "trains", "music", "rain"]
    return [{"messages": [
        {"role": "user", "content": f"Tell me something about {topics[i % len(topics)]} ({i})."},
        {"role": "assistant",
         "content": f"Arr matey! {topics[i % len(topics)].capitalize()} are a fine thing to "
                    f"talk about, and here is fact number {i} about them."}]}
        for i in range(n)]


def plain_peft(model_dir: Path, data: list[dict], steps: int, batch_size: int, r: int,
               max_len: int) -> tuple[float, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    texts = [tok.apply_chat_template(e["messages"], tokenize=False) for e in data]
    tokens, started = 0, time.perf_counter()
    for step in range(steps):
        batch = [texts[(step * batch_size + i) % len(texts)] for i in range(batch_size)]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(enc["attention_mask"].sum())
    return time.perf_counter() - started, tokens


def loraplex_trainer(model_dir: Path, data: list[dict], steps: int, batch_size: int, r: int,
                     max_len: int) -> tuple[float, int]:
    from adapters.training.trainer import TrainConfig, train

    epochs = max(1, -(-steps * batch_size // len(data)))
    config = TrainConfig(r=r, alpha=2 * r, epochs=epochs, batch_size=batch_size,
                         max_seq_len=max_len, checkpoint_every_steps=10**6,
                         base_model_name=DEFAULT_MODEL_NAME)
    started = time.perf_counter()
    result = train(model_dir, data[: steps * batch_size // epochs], config,
                   Path(tempfile.mkdtemp(prefix="lpx-train-bench-")))
    return time.perf_counter() - started, result.trained_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(HERE.parent / ".cache" / "models")
    data = examples(args.steps * args.batch_size)
    rows = {}
    for name, fn in (("plain PEFT loop", plain_peft), ("loraplex trainer", loraplex_trainer)):
        seconds, tokens = fn(model_dir, data, args.steps, args.batch_size, args.rank,
                             args.max_len)
        rows[name] = (seconds, tokens, tokens / seconds)
        print(f"{name:18} {args.steps} steps, {tokens} tokens in {seconds:.1f} s: "
              f"{tokens / seconds:.1f} tokens/s", flush=True)
    ratio = rows["loraplex trainer"][2] / rows["plain PEFT loop"][2]
    print(f"loraplex/plain throughput: {ratio:.3f}x")
    print(json.dumps({k: {"seconds": v[0], "tokens": v[1], "tokens_per_s": v[2]}
                      for k, v in rows.items()}))


if __name__ == "__main__":
    main()
