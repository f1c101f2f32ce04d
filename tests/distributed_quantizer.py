"""A process of tests/test_vqvae.py's distributed codebook test: a module of its own, so that
the spawned processes import torch and the quantizer only."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vae_experiments.models.quantizer import VectorQuantizer


def quantize_in_a_process(rank: int, world_size: int, address: str) -> None:
    """Trains both kinds of codebook for a few steps on batches of this process's own, then
    checks that every process holds the same codes."""
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial codebooks, as DDP's broadcast of the weights
        quantizers = [
            VectorQuantizer(8, 2, ema_decay=None, dead_code_steps=1),
            VectorQuantizer(8, 2, ema_decay=0.9, dead_code_steps=1),
        ]
        torch.manual_seed(rank)  # each process its own batches and its own random picks
        for _ in range(3):
            z_e = torch.randn(4, 2, 2, 2) + 10 * rank
            for quantizer in quantizers:
                quantizer.train()(z_e)
        for quantizer in quantizers:
            codebook = quantizer.codebook.detach().contiguous()
            gathered = [torch.empty_like(codebook) for _ in range(world_size)]
            dist.all_gather(gathered, codebook)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:])
    finally:
        dist.destroy_process_group()
