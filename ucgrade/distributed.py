"""Several processes, one model: torchrun starts one process per GPU (or per CPU share), and
DistributedDataParallel keeps their copies of the model equal.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op and the
run is one process, as always. Every collective below is called by every process, in the same
order, so none waits for a partner that never comes.
"""

import atexit
import datetime
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


def torchrun_env():
    """(rank, local_rank, world_size) when torchrun started this process, else None."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(name in os.environ for name in names):
        return None
    return tuple(int(os.environ[name]) for name in names)


def env_world_size():
    """The number of processes torchrun starts (1 without torchrun); readable before they connect."""
    env = torchrun_env()
    return env[2] if env else 1


def processes_on_this_machine():
    """torchrun's processes on this machine (LOCAL_WORLD_SIZE), which each hold their own image cache."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if torchrun_env() else 1


def init(device):
    """Connect this process to the others: NCCL between GPUs, gloo between CPU processes."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **options)
    atexit.register(shutdown)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices, runtime):
    """This process's share of indices: every world_size-th item from its rank, so that the shares,
    put back by gather(), are the items in their order, each exactly once."""
    return indices[runtime.rank :: runtime.world_size]


def gather(values, runtime):
    """The shares (np arrays or tensors, first axis) of every process, interleaved back into order."""
    if runtime.world_size == 1:
        return values
    shares = [None] * runtime.world_size
    dist.all_gather_object(shares, values.cpu() if torch.is_tensor(values) else values)
    shares = [share for share in shares if len(share)] or shares[:1]  # a process with no share (tiny sets)
    total = sum(len(share) for share in shares)
    merged = shares[0].new_empty((total, *shares[0].shape[1:])) if torch.is_tensor(values) else None
    if merged is None:
        merged = np.empty((total, *shares[0].shape[1:]), dtype=shares[0].dtype)
    for rank, share in enumerate(shares):
        merged[rank : rank + len(share) * runtime.world_size : runtime.world_size] = share
    return merged


def any_process(flag, runtime):
    """True on every process when flag is True on any of them (a stop, an error seen by one)."""
    if runtime.world_size == 1:
        return bool(flag)
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(runtime):
    """Wait until every process is here (and so has finished what it did before, such as writing a file)."""
    if runtime.world_size > 1:
        dist.barrier()


def broadcast(value, runtime):
    """Process 0's value, on every process (the name of the run folder it made, say)."""
    if runtime.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, runtime):
    """The module that training steps call: DistributedDataParallel over model when several processes run."""
    if runtime.world_size == 1:
        return model
    device_ids = [runtime.device] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batch_norm(model, runtime):
    """Batch norm over the global batch: torch's SyncBatchNorm on GPUs, GlobalBatchNorm on CPUs (which
    torch's does not support)."""
    if runtime.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # a process group of their own: gloo runs collectives on several threads, and batch norm's, made
    # during the backward pass, must not pair up with DistributedDataParallel's gradient reductions
    group = dist.new_group(backend="gloo")
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, GlobalBatchNorm.from_batch_norm(child, group))
    return model


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from the batches of all processes (for gloo on CPUs).

    The per-channel sums are added across processes with a differentiable all_reduce, so the
    gradients are those of one batch norm over the global batch. Its state_dict is BatchNorm2d's.
    """

    @classmethod
    def from_batch_norm(cls, bn, group):
        """The same parameters and buffers (shared, as SyncBatchNorm.convert_sync_batchnorm shares them)."""
        module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        module.group = group
        if bn.affine:
            module.weight, module.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            module.running_mean, module.running_var = bn.running_mean, bn.running_var
            module.num_batches_tracked = bn.num_batches_tracked
        return module

    def __getstate__(self):
        """A copy (the backbone of a model, say) leaves the process group out, which cannot be copied; it
        then sums over all processes of the run, if it ever trains."""
        state = self.__dict__.copy()
        state.pop("group", None)
        return state

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf, shape = x.float(), (1, x.shape[1], 1, 1)
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        with warnings.catch_warnings():  # the autograd all_reduce is deprecated for a private successor
            warnings.simplefilter("ignore", FutureWarning)
            sums = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), count]), group=getattr(self, "group", None))
            total = sums[-1]
            mean = sums[:-1] / total
            centered = xf - mean.view(shape)  # two passes: the variance of small activations keeps its digits
            var = dist_nn.all_reduce((centered * centered).sum((0, 2, 3)), group=getattr(self, "group", None)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * total / (total - 1).clamp_min(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)
