"""Train a small SA-ResNet on scikit-learn's digits (8x8 handwritten digits, 1797 images shipped
with scikit-learn: nothing is downloaded), with the fused Shuffle Attention layers and with the
reference layers, from the same seed; plot both runs' loss and test accuracy to one PNG.

    python examples/train_digits.py                      # 12 epochs, fused and eager, digits.png
    python examples/train_digits.py --epochs 3 --png /tmp/d.png
    torchrun --standalone --nproc-per-node 2 examples/train_digits.py  # DDP (fused only)

Under torchrun (WORLD_SIZE set) each process trains the fused network on its share of every batch
(nccl with a GPU a process where there are enough GPUs, else gloo on the CPU); rank 0 prints the
test accuracy and writes the PNG.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import sa_cuda


def load_digits(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Train and test splits (80/20, stratified): images [n, 1, 8, 8] in ``dtype`` scaled to
    [0, 1], labels."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )

    def images_of(a):
        return torch.tensor(a, dtype=dtype).reshape(-1, 1, 8, 8) / 16.0

    return images_of(x_train), torch.tensor(y_train), images_of(x_test), torch.tensor(y_test)


class Block(nn.Module):
    """A ResNet basic block with Shuffle Attention after its last BatchNorm, as in SA-Net."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, fused: bool):
        super().__init__()
        sa = sa_cuda.SALayer if fused else sa_cuda.reference.SALayer
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.sa = sa(cout, groups)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.sa(self.bn2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))


def sa_resnet_digits(
    fused: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """8x8 -> 10 classes: a stem, two SA blocks (32 channels at 8x8, 64 at 4x4), pooling, a linear
    layer. The same weights for fused=True and fused=False (same seed, same state_dict keys)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32, 32, 1, groups=8, fused=fused),
        Block(32, 64, 2, groups=8, fused=fused),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return net.to(dtype)


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # per step (this process's share)
    accuracy: list[float] = field(default_factory=list)  # test accuracy after each epoch
    seconds: float = 0.0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    desc: str = "train",
) -> History:
    """AdamW with a cosine schedule; the batches' order comes from ``seed``, so two runs with the
    same seed see the same batches. With world > 1 each rank takes its share of every batch."""
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    history = History()
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", disable=rank != 0)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            idx = idx[rank::world]  # this rank's share
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            schedule.step()
            history.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        history.accuracy.append(accuracy(model, x_test, y_test))
    history.seconds = time.perf_counter() - start
    return history


def plot(histories: dict[str, History], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, h), style in zip(histories.items(), ("-", "--")):
        ax_loss.plot(range(1, len(h.losses) + 1), h.losses, style, label=name)
        ax_acc.plot(
            range(1, len(h.accuracy) + 1), [100 * a for a in h.accuracy], style + "o", label=name
        )
    ax_loss.set(xlabel="training step", ylabel="cross-entropy loss (batch)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SA-ResNet on scikit-learn digits: fused vs eager Shuffle Attention, same seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="digits.png", help="where the curves go")
    p.add_argument("--no-eager", action="store_true", help="train the fused network only")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    data = load_digits(args.seed, dtype)
    options = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: DistributedDataParallel, fused only
        # a GPU a process (nccl) where there are enough, else the CPU (gloo)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        device = (
            torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        )
        if cuda:
            torch.cuda.set_device(device)
        data = tuple(t.to(device) for t in data)
        model = nn.parallel.DistributedDataParallel(
            sa_resnet_digits(True, args.seed, dtype).to(device)
        )
        h = train(model, data, args.epochs, rank=rank, world=world, desc="fused (DDP)", **options)
        if rank == 0:
            print(
                f"fused, {world} processes: test accuracy {100 * h.accuracy[-1]:.2f}% in {h.seconds:.1f} s"
            )
            plot({f"fused, DDP x{world} (rank 0's share)": h}, args.png)
        dist.destroy_process_group()
        return 0

    fused = sa_resnet_digits(True, args.seed, dtype)
    histories = {"fused": train(fused, data, args.epochs, desc="fused", **options)}
    if not args.no_eager:
        eager = sa_resnet_digits(False, args.seed, dtype)
        histories["eager"] = train(eager, data, args.epochs, desc="eager", **options)
    for name, h in histories.items():
        print(
            f"{name}: test accuracy {100 * h.accuracy[-1]:.2f}% after {args.epochs} epochs, {h.seconds:.1f} s"
        )
    plot(histories, args.png)
    print(f"curves: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
