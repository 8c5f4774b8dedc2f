"""Regenerate the shipped reflective model from scratch: `python -m sprm_kernels.model.shipped.build [--out DIR]`.

1. a character tokenizer (`<think>`, `</think>`, `.\\n\\n` single tokens; generation prompt ends with `<think>`);
2. a ~0.8M-parameter Qwen2 policy, supervised on traces of `task.py`: 12% of the sums are wrong and in the loss
   (the policy learns to slip now and then), 15% more sums and 10% of the operands are wrong only in the input (the
   verdict learns what an error looks like); every wrong step is marked `n`;
3. its own rollouts on training problems (k candidates per problem, temperature 1), scored by the verifier;
4. two SPRM heads on the frozen policy's layer L-2 features at the step positions: the SPR loss (shipped as the
   head of the folder) and plain BCE (the ablation, in `bce_head/`).
Everything is seeded; CPU only. The folder is the official MetaStone-S1 layout plus `sprm_head.safetensors`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import time

import torch
from torch import nn

from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.shipped import SHIPPED_DIR, task
from sprm_kernels.model.shipped.tiny import CHAT_TEMPLATE, MARKERS, make_char_tokenizer, save_char_tokenizer

CHARS = list("0123456789+=? yn.\n")
POLICY = dict(hidden_size=128, num_layers=4, intermediate_size=384, heads=4, kv_heads=2, max_positions=160)
SFT = dict(
    steps=2000,
    batch=64,
    lr=3e-3,
    warmup=100,
    seed=0,
    slip_rate=task.SLIP_RATE,
    check_rate=task.CHECK_RATE,
    operand_check_rate=task.OPERAND_CHECK_RATE,
)
ROLLOUTS = dict(problems=1024, k=16, temperature=1.0, seed=1)
HEAD = dict(epochs=40, bce_warmup_epochs=20, batch=128, lr=2e-3, dropout=0.5, spr_dropout=0.0, seed=2)
log_flushed = functools.partial(print, flush=True)
EVAL_TEMPERATURE = 1.0  # the temperature the head was trained and evaluated at (stored in sprm_task.json)


def make_tokenizer():
    """tiny.make_char_tokenizer's layout with the task's characters (verdicts `y` / `n`, `?`)."""
    return make_char_tokenizer(MARKERS, CHAT_TEMPLATE, chars=CHARS)


def save_tokenizer(path) -> None:
    """The files of `make_tokenizer` (the same bytes whatever the transformers version)."""
    save_char_tokenizer(path, MARKERS, CHAT_TEMPLATE, chars=CHARS)


def make_policy(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=POLICY["hidden_size"], intermediate_size=POLICY["intermediate_size"],
        num_hidden_layers=POLICY["num_layers"], num_attention_heads=POLICY["heads"],
        num_key_value_heads=POLICY["kv_heads"], max_position_embeddings=POLICY["max_positions"],
        tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def encode_example(tokenizer, problem: task.Problem, rng: random.Random) -> tuple[list[int], list[int]]:
    """(token ids of prompt + trace + answer + EOS, labels: the ids where supervised, -100 elsewhere)."""
    from sprm_kernels.model.core.tokens import chat_prompt_ids

    ids = chat_prompt_ids(tokenizer, problem.prompt)
    labels = [-100] * len(ids)
    segments = task.trace_segments(problem, rng, SFT["slip_rate"], SFT["check_rate"], SFT["operand_check_rate"])
    for text, supervised in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [-100] * len(piece)
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def train_policy(model, tokenizer, *, log=log_flushed) -> None:
    """Next-token loss on the response (thinking, answer, EOS) of freshly drawn training problems."""
    rng = random.Random(SFT["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    schedule = lambda step: min(1.0, (step + 1) / SFT["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / SFT["steps"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start = time.time()
    for step in range(SFT["steps"]):
        batch = [
            encode_example(tokenizer, p, rng)
            for p in task.problems("train", SFT["batch"], seed=10_000 + step, difficulty=rng.randint(2, 8))
        ]  # mixed lengths (2-8 terms) so the policy is not tied to one step count
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, (ids, row_labels) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 250 == 0 or step == SFT["steps"] - 1:
            log(f"  sft step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f}s")
    model.eval()


def step_features(rm, sequences: list[list[int]], batch_size: int = 256):
    """(features [S, H] at the scored positions, CSR offsets [B+1]) of token sequences (rule: docs/method.md §3)."""
    from sprm_kernels import step_positions

    rows, counts = [], []
    for lo in range(0, len(sequences), batch_size):
        chunk = sequences[lo : lo + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.tensor([s + [rm.pad_token_id] * (width - len(s)) for s in chunk])
        real = torch.arange(width) < torch.tensor([len(s) for s in chunk])[:, None]
        hidden = rm.penultimate_hidden_states(input_ids)
        index, offsets = step_positions(
            input_ids, step_token_ids=rm.step_token_ids, think_start_id=rm.think_start_id,
            think_end_id=rm.think_end_id, attention_mask=real, backend="torch",
        )  # fmt: skip
        rows.append(hidden.reshape(-1, hidden.shape[-1])[index].float().clone())
        counts += offsets.diff().tolist()
    offsets = torch.tensor([0] + counts).cumsum(0)
    return torch.cat(rows), offsets


def within_problem_balanced(correct_per_problem: list[list[bool]], seed: int) -> torch.Tensor:
    """Indices (into the flattened rollouts) of as many right as wrong trajectories of each problem that has both.

    Trained on all rollouts, both heads learned which problems are hard (docs/method.md §10), and within a problem they
    then preferred the wrong trajectories whose dropped carries made the numbers look easy (best-of-32 0.18 with BCE,
    0.08 with SPR, against pass@1 0.54 on validation). Balanced within problems, difficulty predicts nothing."""
    rng = random.Random(seed)
    chosen, start = [], 0
    for outcomes in correct_per_problem:
        right = [start + j for j, ok in enumerate(outcomes) if ok]
        wrong = [start + j for j, ok in enumerate(outcomes) if not ok]
        count = min(len(right), len(wrong))
        chosen += rng.sample(right, count) + rng.sample(wrong, count)
        start += len(outcomes)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def train_head(features, offsets, correct, *, mode: str, trajectories=None, log=log_flushed) -> SPRMHead:
    """An SPRM head on frozen features with `spr_loss` (mode "spr" or "bce"), minibatches of trajectories.

    "spr" starts with `bce_warmup_epochs` of plain BCE, then runs without dropout (`spr_dropout`). The SPR filter
    drops every step of a wrong trajectory that the head judges positive, and a step once dropped is never pushed
    back: from a random head (or after 2 warm-up epochs, or with dropout noise lifting `n` steps above zero) it
    collapsed here to all-positive scores, within-problem gap 0.0000 (bench/experiments/README.md)."""
    from sprm_kernels import spr_loss, sprm_step_logits

    torch.manual_seed(HEAD["seed"])
    head = SPRMHead(features.shape[1])
    nn.init.zeros_(head[3].bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD["lr"])
    generator = torch.Generator().manual_seed(HEAD["seed"])
    trajectories = torch.arange(len(correct)) if trajectories is None else trajectories
    for epoch in range(HEAD["epochs"]):
        warming_up = mode == "spr" and epoch < HEAD["bce_warmup_epochs"]
        dropout = HEAD["spr_dropout"] if mode == "spr" and not warming_up else HEAD["dropout"]
        order = trajectories[torch.randperm(len(trajectories), generator=generator)]
        total = 0.0
        for lo in range(0, len(order), HEAD["batch"]):
            chosen = order[lo : lo + HEAD["batch"]]
            starts, ends = offsets[chosen], offsets[chosen + 1]
            index = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
            batch_offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).cumsum(0)])
            logits = sprm_step_logits(
                features, index, head[0].weight, head[0].bias, head[3].weight, head[3].bias,
                dropout=dropout, generator=generator, backend="torch",
            )  # fmt: skip
            loss = spr_loss(logits, batch_offsets, correct[chosen], mode="bce" if warming_up else mode)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        if epoch % 10 == 0 or epoch == HEAD["epochs"] - 1:
            log(f"  {mode} head epoch {epoch:3d}  loss {total:.4f}")
    return head.eval()


def save_folder(path, model, tokenizer, head: SPRMHead) -> None:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(path)
    head.save_pretrained(path, save_pt=True)  # score_module.pt (published layout) + sprm_head.safetensors
    with open(os.path.join(path, "sprm_task.json"), "w") as f:
        json.dump(
            {"task": "running-sum addition with step verdicts (sprm_kernels.model.task)",
             "difficulty": task.DEFAULT_DIFFICULTY, "temperature": EVAL_TEMPERATURE, "top_p": 1.0,
             "policy": POLICY, "sft": SFT, "rollouts": ROLLOUTS, "head": HEAD},
            f, indent=1,
        )  # fmt: skip


def build(out: str = SHIPPED_DIR, *, policy_from: str | None = None, threads: int = 1, log=log_flushed) -> dict:
    """Everything from scratch into `out`; `policy_from` (a folder this wrote) skips the SFT (for experiments)."""
    from transformers import AutoModelForCausalLM

    from sprm_kernels.model.engines.hf.engine import ReflectiveModel
    from sprm_kernels.model.evaluation.best_of_k import sample_candidates

    torch.set_num_threads(threads)  # 1 on a shared machine: 2 contended threads ran 3x slower in total here
    times, start = {}, time.time()
    tokenizer = make_tokenizer()
    if policy_from:
        model = AutoModelForCausalLM.from_pretrained(policy_from, dtype=torch.float32).eval()
    else:
        model = make_policy(len(tokenizer), seed=SFT["seed"])
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        log(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
        train_policy(model, tokenizer, log=log)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)  # the policy alone already (the heads follow)
        save_tokenizer(out)
    times["sft"] = time.time() - start

    rm = ReflectiveModel(model, tokenizer, SPRMHead(POLICY["hidden_size"]), backend="torch")
    train_problems = task.problems("train", ROLLOUTS["problems"], seed=ROLLOUTS["seed"])
    rollouts = sample_candidates(
        rm, train_problems, k=ROLLOUTS["k"], temperature=ROLLOUTS["temperature"], seed=ROLLOUTS["seed"]
    )
    correct = torch.tensor([c for per_problem in rollouts["correct"] for c in per_problem], dtype=torch.bool)
    log(f"rollouts: {len(correct)} trajectories, {correct.float().mean():.3f} correct")
    times["rollouts"] = time.time() - start - sum(times.values())

    sequences = [seq for per_problem in rollouts["sequences"] for seq in per_problem]
    features, offsets = step_features(rm, sequences)
    balanced = within_problem_balanced(rollouts["correct"], seed=HEAD["seed"])
    log(f"heads: {len(balanced)} trajectories of problems with both outcomes, balanced within each problem")
    heads = {
        mode: train_head(features, offsets, correct, mode=mode, trajectories=balanced, log=log)
        for mode in ("spr", "bce")
    }
    times["heads"] = time.time() - start - sum(times.values())

    save_folder(out, model, tokenizer, heads["spr"])
    heads["bce"].save_pretrained(os.path.join(out, "bce_head"), save_pt=True)
    times["total"] = time.time() - start
    log("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in times.items()))
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=SHIPPED_DIR, help="output folder (default: the package's shipped/)")
    parser.add_argument("--sft-steps", type=int, default=SFT["steps"])
    parser.add_argument("--policy-from", default=None, help="reuse the policy of a folder built before (experiments)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    SFT["steps"] = args.sft_steps
    build(args.out, policy_from=args.policy_from, threads=args.threads)


if __name__ == "__main__":
    main()
