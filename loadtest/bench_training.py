"""Training throughput: loraplex's trainer against a plain PEFT loop, same data, one run.

Both fine-tune the default base model with the same LoRA settings, batch size, sequence
length and number of steps on the same chat examples; both count the non-padding tokens
they push through the model. loraplex's trainer adds assistant-only labels, a cosine
schedule, checkpoints and progress callbacks; the plain loop is the minimal PEFT recipe.

    .venv/bin/python loadtest/bench_training.py --steps 12 --batch-size 4

`--packing` measures padding-free packing instead: loraplex's trainer with packing on and off
on chat examples of mixed lengths (short answers next to long ones, as real chat data is),
the two arms alternated for `--rounds` rounds so that machine noise falls on both, and the
median of each reported with the ratio.

    .venv/bin/python loadtest/bench_training.py --packing --steps 8 --batch-size 8 --rounds 3
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


def mixed_examples(n: int, seed: int = 0) -> list[dict]:
    """Chat examples whose answers run from one short sentence to a dozen (lengths drawn
    uniformly), so that a padded batch is about half padding."""
    import random

    rng = random.Random(seed)
    topics = ["the sea", "mountains", "rivers", "bread", "the moon", "trains", "music", "rain"]
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        sentences = [f"Fact {k} about {topic}: it is worth knowing, matey." for k in
                     range(rng.randint(1, 12))]
        out.append({"messages": [
            {"role": "user", "content": f"Tell me about {topic} ({i})."},
            {"role": "assistant", "content": "Arr! " + " ".join(sentences)}]})
    return out


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
                     max_len: int, packing: bool = True) -> tuple[float, int]:
    from adapters.training.trainer import TrainConfig, train

    epochs = max(1, -(-steps * batch_size // len(data)))
    config = TrainConfig(r=r, alpha=2 * r, epochs=epochs, batch_size=batch_size,
                         max_seq_len=max_len, checkpoint_every_steps=10**6,
                         base_model_name=DEFAULT_MODEL_NAME, packing=packing)
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
    p.add_argument("--packing", action="store_true",
                   help="packing on against off, on examples of mixed lengths")
    p.add_argument("--rounds", type=int, default=3, help="--packing: alternated rounds")
    p.add_argument("--row-tokens", type=int, default=None,
                   help="--packing: the longest packed row (default: the trainer's own)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(HERE.parent / ".cache" / "models")
    if args.packing:
        packing_ab(model_dir, args)
        return
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


def packing_ab(model_dir: Path, args: argparse.Namespace) -> None:
    import statistics

    from adapters.training.dataset import tokenize_example
    from adapters.training.trainer import load_tokenizer

    if args.row_tokens is not None:  # attention over a packed row is quadratic in its length
        import functools

        import adapters.training.trainer as trainer
        from adapters.training.dataset import flatten

        trainer.flatten = functools.partial(flatten, row_tokens=args.row_tokens)  # type: ignore[assignment]
        print(f"packed rows of at most {args.row_tokens} tokens")
    data = mixed_examples(args.steps * args.batch_size)
    tok = load_tokenizer(model_dir)
    lengths = [len(tokenize_example(tok, e["messages"], args.max_len)[0]) for e in data]
    padded = sum(max(lengths[i:i + args.batch_size]) * len(lengths[i:i + args.batch_size])
                 for i in range(0, len(lengths), args.batch_size))
    print(f"{len(data)} examples of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.0f}); padded batches would be "
          f"{1 - sum(lengths) / padded:.0%} padding", flush=True)
    rates: dict[str, list[float]] = {"packing": [], "padding": []}
    for round_ in range(1, args.rounds + 1):
        order = ("packing", "padding") if round_ % 2 else ("padding", "packing")
        for arm in order:
            seconds, tokens = loraplex_trainer(model_dir, data, args.steps, args.batch_size,
                                               args.rank, args.max_len, arm == "packing")
            rates[arm].append(tokens / seconds)
            print(f"round {round_} {arm:8} {tokens} tokens in {seconds:.1f} s: "
                  f"{tokens / seconds:.1f} tokens/s", flush=True)
    medians = {arm: statistics.median(r) for arm, r in rates.items()}
    print(f"median tokens/s: packing {medians['packing']:.1f}, padding "
          f"{medians['padding']:.1f}; packing/padding {medians['packing'] / medians['padding']:.2f}x")
    print(json.dumps({"rates": rates, "medians": medians}))


if __name__ == "__main__":
    main()
