"""A small model trained at test time: random weights give flat next-token distributions, so quantization
error barely changes their greedy choices; a model trained for a few seconds on repetitive text has the
peaked distributions of a real one, where it does.

Training uses the independent reference forward (tests/reference.py), which is plain differentiable torch
on a whole state dict."""

import torch

from llama_mp.checkpoints.params import ModelArgs
from llama_mp.checkpoints.synth import random_state_dict
from reference import reference_logits

SENTENCES = ["the cat sat on the mat and looked at the dog", "a dog ran to the park to find a red ball",
             "the sun rose over the hills and the birds began to sing", "she read the book and then she slept"]


def training_text(repeats: int = 6) -> str:
    return " . ".join(SENTENCES[i % len(SENTENCES)] for i in range(repeats * len(SENTENCES)))


def train(args: ModelArgs, tokens, steps: int = 60, max_steps: int = 400, good_loss: float = 0.1, seq: int = 48,
          lr: float = 1e-2, seed: int = 0):
    """(whole-model float32 state dict, last loss) after training on windows of `tokens` (next-token cross
    entropy) for `steps` steps, and on up to `max_steps` until the loss is below `good_loss` (a longer text,
    as a smaller tokenizer makes it, takes more)."""
    torch.manual_seed(seed)
    state = {k: v.float().clone().requires_grad_(True) for k, v in random_state_dict(args, seed=seed).items()}
    optimizer = torch.optim.Adam(state.values(), lr=lr)
    data = torch.tensor(tokens)
    for step in range(max_steps):
        start = (step * 7) % max(len(tokens) - seq - 1, 1)
        window = data[start:start + seq + 1].tolist()
        logits = reference_logits(state, args, window[:-1])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step + 1 >= steps and loss.item() < good_loss:
            break
    return {k: v.detach() for k, v in state.items()}, loss.item()
