"""Local training steps: what one client does with its data in one round.

Data are whole tensors already on the device; a batch is an index into them, so the loop does
no per-sample work. Every function takes a `torch.Generator` for its shuffling, so a client's
round is reproducible from its seed whatever process runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gefl.generators import Generator
from gefl.optim import SGD, Adam
from gefl.schema import TrainConfig


def sgd(module: nn.Module, cfg: TrainConfig) -> SGD:
    return SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _batches(n: int, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches. A lone last sample joins the batch before it: BatchNorm cannot
    train on a batch of one where a head pools to 1x1 (mobilenet-v3-small), and dropping the
    sample would waste a client's data."""
    batches = list(torch.randperm(n, generator=rng).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return batches


def train_epochs(
    module: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
    prox_mu: float = 0.0,
) -> float:
    """`cfg.local_epochs` epochs of cross-entropy SGD; returns the mean batch loss. `labels` are
    class indices, or per-class target probabilities (soft labels, as AvgKD trains on).

    With `prox_mu > 0` (FedProx) the loss gains mu/2 * ||w - w_start||^2, the squared norm of the
    FedProx paper, pulling towards the global weights the module started the round with.
    """
    module.train()
    opt = sgd(module, cfg)
    anchor = [p.detach().clone() for p in module.parameters()] if prox_mu > 0 else None
    total, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        for idx in _batches(len(labels), cfg.batch_size, rng):
            loss = F.cross_entropy(module(inputs[idx]), labels[idx])
            objective = loss
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(module.parameters(), anchor))
                objective = loss + 0.5 * prox_mu * prox
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            total += loss.item()
            steps += 1
    return total / max(steps, 1)


def train_on_generated(
    module: nn.Module,
    generator: Generator,
    num_batches: int,
    num_classes: int,
    cfg: TrainConfig,
    rng: torch.Generator,
) -> float:
    """`num_batches` batches of generated samples with uniformly drawn labels."""
    module.train()
    generator.eval()
    opt = sgd(module, cfg)
    device = next(module.parameters()).device
    total = 0.0
    for _ in range(num_batches):
        labels = torch.randint(num_classes, (cfg.batch_size,), generator=rng).to(device)
        with torch.no_grad():
            samples = generator.sample(labels)
        loss = F.cross_entropy(module(samples), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(num_batches, 1)


def train_generator(
    generator: Generator,
    data: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    optimizer: Adam,
    rng: torch.Generator,
) -> float:
    """Epochs of the generator's own training steps on real data (images, or frozen-FE features),
    then its summary of the data (`Generator.summarise`); returns the mean batch loss."""
    generator.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in _batches(len(labels), batch_size, rng):
            if len(idx) < 2:  # BatchNorm cannot normalise a batch of one
                continue
            total += generator.train_step(data[idx], labels[idx], optimizer)
            steps += 1
    generator.summarise(data, labels)
    return total / max(steps, 1)


@torch.no_grad()
def extract_features(fe: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """FE output in eval mode; the FE is frozen, so no graph is kept."""
    fe.eval()
    return torch.cat([fe(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits in eval mode, without gradients (a teacher's outputs)."""
    model.eval()
    return torch.cat([model(inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)])


def predict_proba(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Softmax outputs in eval mode (a teacher's soft labels)."""
    return F.softmax(predict_logits(model, inputs, batch_size), 1)


def distil(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, batch_size: int,
           lr: float, temperature: float, rng: torch.Generator) -> float:
    """FedDF's server step: Adam on the KL divergence from the ensemble's soft targets to the
    student's tempered softmax, one random batch of the unlabelled inputs per step. Returns the
    mean loss."""
    student.train()
    opt = Adam(student.parameters(), lr=lr)
    total = 0.0
    for _ in range(steps):
        idx = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=rng)
        log_probs = F.log_softmax(student(inputs[idx]) / temperature, 1)
        loss = F.kl_div(log_probs, targets[idx], reduction="batchmean") * temperature**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((model(images[i: i + batch_size]).argmax(1) == labels[i: i + batch_size]).sum())
    return 100.0 * correct / max(len(labels), 1)
