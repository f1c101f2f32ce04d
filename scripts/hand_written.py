"""A VAE trained by a loop written by hand, the way a researcher writes one in an afternoon: the
baseline that ``scripts/benchmark.py`` times ``python train.py`` against.

It imports torch, numpy and the standard library only (nothing of ``vae_experiments``, no
Lightning), reads Fashion-MNIST's IDX files itself, keeps the uint8 splits in memory and prints
one JSON object on stdout: each epoch's wall and CPU seconds (an epoch runs from its start to the
next one's, its validation pass over the whole validation split included), the test loss
(negative ELBO, nats per image), the images and optimizer steps per epoch, the threads used.

    python scripts/hand_written.py --network mlp --hidden 200,200 --activation tanh --latent 50 \
        --batch-size 20 --binarize dynamic --eps 1e-4 --lr-milestones 1,4,13 \
        --lr-gamma 0.7197 --max-train-batches 1000 --epochs 3

The model is a VAE with a diagonal Gaussian posterior, N(0, I) prior and Bernoulli pixels: the
loss is the negative ELBO, binary cross-entropy with logits summed over pixels plus the analytic
KL, averaged over the batch (Kingma & Welling 2013, https://arxiv.org/abs/1312.6114).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Where the IDX files are looked for, in order (as the benchmark's data=fashion_mnist does).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": "train-images-idx3-ubyte",
    "test": "t10k-images-idx3-ubyte",
}


def find_file(name: str) -> Path:
    base = Path(os.environ.get("VAE_DATA_DIR", "data"))
    for directory in (base / "FashionMNIST" / "raw", base, DEBIAN_DIR):
        for path in (directory / f"{name}.gz", directory / name):
            if path.exists():
                return path
    sys.exit(f"error: {name}(.gz) not found in $VAE_DATA_DIR (or data/) nor in {DEBIAN_DIR}")


def read_images(path: Path) -> torch.Tensor:
    """An IDX image file as uint8 (N, 1, H, W)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    n, h, w = struct.unpack(">III", data[4:16])
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, h, w).copy())


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each pixel drawn once from Bernoulli(intensity / 255), kept as uint8 0/255."""
    return torch.bernoulli(images.float() / 255, generator=generator).mul_(255).to(torch.uint8)


def mlp_nets(hidden: list[int], latent: int, activation: str) -> tuple[nn.Module, nn.Module]:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]

    def layers(sizes: list[int]) -> list[nn.Module]:  # Linear, act, ..., Linear
        out: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            out += [nn.Linear(n_in, n_out), act()]
        return out[:-1]

    encoder = nn.Sequential(nn.Flatten(), *layers([784, *hidden, 2 * latent]))
    decoder = nn.Sequential(*layers([latent, *hidden[::-1], 784]), nn.Unflatten(1, (1, 28, 28)))
    return encoder, decoder


def conv_nets(channels: list[int], latent: int) -> tuple[nn.Module, nn.Module]:
    """Stride-2 Conv-BatchNorm-LeakyReLU blocks while the side stays >= 2 (28 -> 14 -> 7 -> 4 ->
    2), a linear layer to the posterior; the decoder mirrors it with transposed convolutions and
    ends in a 3x3 conv."""
    sides = [28]
    while len(sides) <= len(channels) and (sides[-1] + 1) // 2 >= 2:
        sides.append((sides[-1] + 1) // 2)
    channels = channels[: len(sides) - 1]
    flat = channels[-1] * sides[-1] ** 2
    enc: list[nn.Module] = []
    for c_in, c_out in zip([1, *channels[:-1]], channels, strict=True):
        enc += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(),
        ]
    enc += [nn.Flatten(), nn.Linear(flat, 2 * latent)]
    dec: list[nn.Module] = [
        nn.Linear(latent, flat),
        nn.Unflatten(1, (channels[-1], sides[-1], sides[-1])),
    ]
    outs = [channels[0], *channels[:-1]]
    for i in reversed(range(len(channels))):
        pad = sides[i] - (2 * sides[i + 1] - 1)  # 1 where the encoder halved an even side
        dec += [
            nn.ConvTranspose2d(channels[i], outs[i], 3, stride=2, padding=1, output_padding=pad),
            nn.BatchNorm2d(outs[i]),
            nn.LeakyReLU(),
        ]
    dec.append(nn.Conv2d(channels[0], 1, 3, padding=1))
    return nn.Sequential(*enc), nn.Sequential(*dec)


def negative_elbo(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """-ELBO per image (B,) for x (B, 1, 28, 28) in [0, 1], one z per image."""
    mu, logvar = encoder(x).chunk(2, dim=1)  # (B, D) each
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    logits = decoder(z)  # (B, 1, 28, 28)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
    return recon + kl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--hidden", default="512", help="MLP hidden widths, image side first")
    p.add_argument("--activation", choices=["relu", "tanh"], default="relu")
    p.add_argument("--channels", default="32,64,128,256,512", help="conv block channels")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-batches", type=int, default=None)
    p.add_argument("--max-val-batches", type=int, default=None)
    p.add_argument("--max-test-batches", type=int, default=None)
    p.add_argument("--val-size", type=int, default=5000, help="carved from the train file")
    p.add_argument("--binarize", choices=["none", "dynamic"], default="none")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=None, help="Adam's eps (default: torch's)")
    p.add_argument("--betas", default=None, help="Adam's betas, e.g. 0.9,0.999 (torch's)")
    p.add_argument("--lr-milestones", default="", help="epochs where the lr is multiplied by")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="... this")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # Data: uint8 in memory; val carved from the train file with a fixed seed, t10k is test.
    train = read_images(find_file(FILES["train"]))
    test = read_images(find_file(FILES["test"]))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    val, train = train[perm[: args.val_size]], train[perm[args.val_size :]]
    if args.binarize == "dynamic":  # training batches are drawn per step; val/test once
        generator = torch.Generator().manual_seed(0)
        val, test = binarize(val, generator), binarize(test, generator)
    train, val, test = train.to(device), val.to(device), test.to(device)

    if args.network == "mlp":
        hidden = [int(h) for h in args.hidden.split(",") if h]
        encoder, decoder = mlp_nets(hidden, args.latent, args.activation)
    else:
        encoder, decoder = conv_nets([int(c) for c in args.channels.split(",")], args.latent)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    encoder.to(device, memory_format=memory_format)
    decoder.to(device, memory_format=memory_format)
    params = [*encoder.parameters(), *decoder.parameters()]
    adam = {"lr": args.lr}
    if args.eps is not None:
        adam["eps"] = args.eps
    if args.betas:
        adam["betas"] = tuple(float(b) for b in args.betas.split(","))
    optimizer = torch.optim.Adam(params, **adam)
    milestones = [int(m) for m in args.lr_milestones.split(",") if m]
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, args.lr_gamma)
        if milestones
        else None
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def mean_loss(images: torch.Tensor, max_batches: int | None) -> float:
        encoder.eval()
        decoder.eval()
        size = args.eval_batch_size or args.batch_size
        starts = range(0, len(images), size)[:max_batches]
        total = torch.zeros((), device=device)
        for first in starts:
            x = images[first : first + size].float().div_(255)
            x = x.contiguous(memory_format=memory_format)
            total += negative_elbo(encoder, decoder, x).sum()
        return total.item() / min(len(images), len(starts) * size)

    batch = args.batch_size
    steps = len(train) // batch
    if args.max_train_batches is not None:
        steps = min(steps, args.max_train_batches)
    wall, cpu = [], []
    sync()
    mark = (time.perf_counter(), time.process_time())
    for epoch in range(args.epochs):
        encoder.train()
        decoder.train()
        order = torch.randperm(len(train), device=device)
        for i in range(steps):
            x = train.index_select(0, order[i * batch : (i + 1) * batch]).float().div_(255)
            if args.binarize == "dynamic":
                x = torch.bernoulli(x)
            x = x.contiguous(memory_format=memory_format)
            loss = negative_elbo(encoder, decoder, x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        val_loss = mean_loss(val, args.max_val_batches)
        print(f"epoch {epoch + 1}: val loss {val_loss:.2f}", file=sys.stderr, flush=True)
        sync()
        now = (time.perf_counter(), time.process_time())
        wall.append(now[0] - mark[0])
        cpu.append(now[1] - mark[1])
        mark = now
    test_loss = mean_loss(test, args.max_test_batches)

    ours = ("vae_experiments", "pytorch_lightning", "lightning", "hydra")
    result = {
        "epoch_seconds": wall,
        "epoch_cpu_seconds": cpu,
        "test_loss": test_loss,
        "val_loss": val_loss,
        "images": steps * batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "foreign_modules": sorted(m for m in sys.modules if m.split(".")[0] in ours),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
