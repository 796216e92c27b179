"""Point-to-point traffic of the context-parallel attention: K/V blocks out to the ranks that
need them, their dK/dV back to their owners.

Only (rank, rank) pairs with at least one needed block exchange a message (one per pair and
direction per phase, K and V packed side by side along the last dim), so a pattern that
never pairs two shards never sends between them. An Exchange is one batch of messages
(``batch_isend_irecv``; the attention posts one per ring step) that completes in the
background (NCCL: its own stream; gloo: its threads) while the caller computes; ``wait``
joins it. Each work is waited for once (gloo: a second wait on a finished receive never
returns).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.devices import device_guard


def pack(first: torch.Tensor, second: torch.Tensor, tokens=None) -> torch.Tensor:
    """[B, Hkv, n, D1 + D2]: the tokens (all when None) of two [B, Hkv, N, D*] tensors side by
    side, contiguous (one message instead of two)."""
    if tokens is not None:
        first, second = first.index_select(2, tokens), second.index_select(2, tokens)
    return torch.cat([first, second], dim=-1).contiguous()


def unpack(buf: torch.Tensor, first_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of a packed buffer (unit last stride: the kernels take them as is)."""
    return buf[..., :first_dim], buf[..., first_dim:]


class Exchange:
    """One batch of messages: ``sends`` {dst: tensor} and ``recvs`` {src: buffer to fill},
    ranks counted in ``group``. ``stats``: the dict whose ``<phase>_bytes`` and ``messages``
    count what this rank sends."""

    def __init__(self, group, sends: dict, recvs: dict, stats: dict, phase: str):
        self.sends, self.recvs = sends, recvs   # kept alive until the messages complete
        ops = [dist.P2POp(dist.isend, t, _peer(group, dst), group)
               for dst, t in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, t, _peer(group, src), group)
                for src, t in sorted(recvs.items())]
        # NCCL addresses the current device: make it the tensors' (a process that never
        # called torch.cuda.set_device would otherwise post on cuda:0 and may hang).
        self.device = ops[0].tensor.device if ops else torch.device("cpu")
        with device_guard(self.device):
            self.works = dist.batch_isend_irecv(ops) if ops else []
        stats[f"{phase}_bytes"] += sum(t.numel() * t.element_size() for t in sends.values())
        stats["messages"] += len(sends)

    def wait(self) -> dict:
        """Block until every message of the batch completed (NCCL: the current stream waits);
        returns the filled receive buffers."""
        with device_guard(self.device):
            for work in self.works:
                work.wait()
        self.works = []
        return self.recvs


def _peer(group, rank: int) -> int:
    """The global rank of ``rank`` of ``group`` (what the point-to-point calls address)."""
    return rank if group is None else dist.get_global_rank(group, rank)
