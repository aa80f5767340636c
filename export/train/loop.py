"""Training loops for the demo models: deterministic, CPU-sized, with progress bars."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    label_smoothing: float = 0.0
    seed: int = 0
    grad_clip: float = 1.0


#: (examples, batch size, generator) → the index batches of one epoch, covering every example once
Sampler = Callable[[int, int, torch.Generator], Iterator[Tensor]]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 5 % of the peak rate."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def length_buckets(lengths: Tensor, pool: int = 50) -> Sampler:
    """Batches of similar lengths: shuffle, sort each pool of ``pool`` batches by length, cut it
    into batches and shuffle those. Variable-length text (verses) then pads little, while every
    epoch still sees the examples in a fresh order."""

    def sample(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        order = torch.randperm(n, generator=generator)
        chunks = []
        for i in range(0, n, batch_size * pool):
            chunk = order[i : i + batch_size * pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            chunks.extend(chunk.split(batch_size))
        for j in torch.randperm(len(chunks), generator=generator).tolist():
            yield chunks[j]

    return sample


def fit(
    model: nn.Module,
    n_examples: int,
    loss_fn: Callable[[Tensor], Tensor],
    cfg: TrainConfig,
    desc: str,
    sampler: Sampler = batches,
) -> list[float]:
    """Minimise ``loss_fn(batch_indices)`` with AdamW over the batches ``sampler`` draws;
    returns the mean loss of every epoch."""
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _schedule(cfg, cfg.epochs * steps_per_epoch))
    history = []
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(cfg.epochs):
            total = 0.0
            for index in sampler(n_examples, cfg.batch_size, generator):
                loss = loss_fn(index)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optim.step()
                sched.step()
                total += loss.item() * len(index)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            history.append(total / n_examples)
    model.eval()
    return history
