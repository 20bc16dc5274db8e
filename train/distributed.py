"""Processes under torchrun: the process group, DistributedDataParallel, and what the processes
share (random states for a save, the loss of a step, a check of their weights at the end).

Each helper takes the world size and does nothing across processes when it is 1, so that the
loop reads the same for one process and for many.
"""

import hashlib
import logging
import os

import torch
import torch.distributed as dist

from sashimi.generate import resolve_device
from sashimi.model import SaShiMi

log = logging.getLogger(__name__)


def setup_processes(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process on CUDA, gloo on the CPU."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def wrap(model: SaShiMi, world: int, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: `model` itself, or under torchrun a DistributedDataParallel
    over it, which averages the gradients of the processes in backward."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def gather(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Every process's copy of `t`, stacked on the CPU: (world, *t.shape)."""
    if world == 1:
        return t[None]
    parts = [torch.empty_like(t, device=device) for _ in range(world)]
    dist.all_gather(parts, t.to(device))
    return torch.stack(parts).cpu()


def random_states(gain_rng: torch.Generator, world: int, device: torch.device) -> dict:
    """What a save needs to replay the random numbers of the run: the gain augmentation's
    generator, the same in every process, and torch's CPU (and CUDA) state of each process."""
    rng = {"gain": gain_rng.get_state(), "torch_cpu": gather(torch.get_rng_state(), world, device)}
    if device.type == "cuda":
        rng["torch_cuda"] = gather(torch.cuda.get_rng_state(device), world, device)
    return rng


def mean_over_processes(loss: torch.Tensor, world: int) -> float:
    """The mean of every process's `loss`. A NaN on any process makes it NaN on all, so that
    they skip a step together."""
    loss_all = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss_all)
        loss_all /= world
    return loss_all.item()


def weights_sha1(model: SaShiMi) -> str:
    """sha1 of the bytes of every weight, in state_dict order: equal hashes, equal models."""
    digest = hashlib.sha1()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def finish(model: SaShiMi, rank: int, world: int, device: torch.device) -> None:
    """Leave the process group, once every process is shown to hold the same weights: if they
    differ, DistributedDataParallel went wrong."""
    if world == 1:
        return
    sha1 = weights_sha1(model)
    digests = gather(torch.tensor(list(bytes.fromhex(sha1)), dtype=torch.uint8), world, device)
    if not all(torch.equal(d, digests[0]) for d in digests):
        raise RuntimeError(f"the {world} processes ended with different weights")
    if rank == 0:
        log.info(f"all {world} processes hold equal weights (sha1 {sha1})")
    dist.destroy_process_group()
