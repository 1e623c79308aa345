"""Peer-memory collectives: one protocol over memory every rank of a group can read and write.

The baselines' collectives (TP all-reduce, DEP dispatch/combine) without a collective library:
each rank owns one arena (allocated and exchanged once, at start-up) that every peer maps, and the
ranks order themselves through int32 flags inside those arenas. The backend supplies the memory and
two primitives; the protocol here is the same on every backend:

  backend                            memory                       wait / signal
  `ShmPeerMemory` (collectives/shm)  POSIX shared memory (CPU)    host spin with a timeout / store
  `CudaIpcPeerMemory` (cuda_ipc)     device memory over CUDA IPC  stream memory ops (no host sync,
                                                                  capturable in CUDA graphs)

Channels. Every transfer is a *channel* from a producer rank P to a consumer rank C over one region,
with two flags: FULL[c][P] in C's arena (written by P) and EMPTY[c][C] in P's arena (written by C),
initially FULL = 0, EMPTY = 1. Only constants are ever written, so a captured sequence replays
correctly any number of times:
  producer: wait EMPTY == 1 (own arena), EMPTY := 0, write the region, FULL := 1 (consumer's arena)
  consumer: wait FULL == 1 (own arena),  FULL := 0,  read the region,  EMPTY := 1 (producer's arena)
A producer never overwrites a region a consumer has not finished reading, and a consumer never reads
a region before its producer finished writing it (the backend's signal orders every earlier write of
the rank before the flag). A rank's self-channel needs no flags.

Operations (every rank of the group calls the same operations in the same order):
- `all_reduce(x)`: one-shot (every rank stages x in its arena, then reads every peer's copy and sums
  in rank order, in fp32) up to `two_shot_bytes`, two-shot above (reduce-scatter: rank r sums slice r
  of every copy; all-gather: every rank reads the reduced slices). Every rank gets bitwise the same
  result.
- `all_reduce_add_rmsnorm(x, residual, weight, eps)`: the one-shot sum fused with the residual add and
  the RMSNorm that follows it in a decoder layer; returns (residual + sum, rmsnorm(residual + sum)).
- `dispatch(x, ids, weights, rows)` / `combine(y)`: DEP. Pairs (token, k) go to their expert's owner;
  rank s writes its pairs for owner d into d's receive slot [s] at offsets from a prefix sum over the
  destinations, padded to a fixed `rows` (capacity) with a sentinel expert id that no bank holds. The
  owner computes every slot, and writes the results back into s's return slot [d]; s gathers its
  pairs' results and sums each token's k in fp32. `rows` comes from the batch bucket that the ranks
  agreed once on the host before the step (`dep_rows`); a token's k distinct experts put at most
  min(k, experts per rank) pairs into one slot, so a slot never overflows for a batch that fits the
  bucket (checked: a batch larger than the bucket is refused, the caller uses its fallback path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# channel kinds
AR_IN, AR_RED, DISPATCH, COMBINE = range(4)
N_CHANNELS = 4
FULL, EMPTY = 0, 1


@dataclass(frozen=True)
class ArenaLayout:
    """Byte offsets of the flags and regions inside every rank's arena (identical on every rank)."""
    size: int                        # ranks
    ar_bytes: int                    # all-reduce staging (and reduced-slice region) bytes
    dep_slot_rows: int               # DEP capacity per (source, owner) slot, in pairs
    dep_hidden: int
    dep_itemsize: int

    @property
    def flag_count(self) -> int:
        return N_CHANNELS * 2 * self.size

    def flag_index(self, channel: int, which: int, rank: int) -> int:
        return (channel * 2 + which) * self.size + rank

    def regions(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, bytes); every region 256-byte aligned."""
        out, off = {}, _align(self.flag_count * 4)
        slot = self.dep_slot_rows * (self.dep_hidden + 2) * self.dep_itemsize
        ret = self.dep_slot_rows * self.dep_hidden * self.dep_itemsize
        for name, nbytes in (("ar_in", self.ar_bytes), ("ar_red", self.ar_bytes),
                             ("recv", self.size * slot), ("ret", self.size * ret)):
            out[name] = (off, nbytes)
            off = _align(off + nbytes)
        return out

    @property
    def total_bytes(self) -> int:
        name, (off, n) = list(self.regions().items())[-1]
        return _align(off + n)


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


class PeerMemory:
    """Backend contract. `arenas[r]` is a uint8 tensor over rank r's arena (this rank's own and the
    mapped peers'); `flags[r]` an int32 view of its flag words."""
    rank: int
    size: int
    device: torch.device
    layout: ArenaLayout
    arenas: list[torch.Tensor]
    flags: list[torch.Tensor]

    def wait(self, index: int, value: int, who: str) -> None:
        """Block (the host, or the stream) until this rank's flag `index` equals `value`."""
        raise NotImplementedError

    def signal(self, owner: int, index: int, value: int) -> None:
        """Set rank `owner`'s flag `index` to `value`, ordered after every earlier write of this rank."""
        raise NotImplementedError

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src where either may live in a peer's arena."""
        dst.copy_(src)

    def reduce(self, sources: list[torch.Tensor], out: torch.Tensor, residual: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, eps: float = 0.0, norm_out: torch.Tensor | None = None) -> None:
        """out <- sum(sources) in fp32, in list order, rounded to out's dtype; with `residual`,
        out <- round(residual + round(sum)) and, with `weight`, norm_out <- rmsnorm(out) * weight."""
        reduce_reference(sources, out, residual, weight, eps, norm_out)

    def close(self) -> None:
        pass


def reduce_reference(sources, out, residual=None, weight=None, eps=0.0, norm_out=None) -> None:
    """The reduction in torch (CPU backend; the reference for the GPU kernel)."""
    acc = sources[0].float()
    for s in sources[1:]:
        acc = acc + s.float()
    if residual is None:
        out.copy_(acc)
        return
    h = acc.to(out.dtype).float() + residual.float()
    out.copy_(h)
    if weight is not None:
        hq = out.float()
        rms = torch.rsqrt(hq.pow(2).mean(-1, keepdim=True) + eps)
        norm_out.copy_(hq * rms * weight.float())            # one rounding, as torch's rms_norm


class PeerCollectives:
    """The protocol (see the module docstring) over a `PeerMemory` backend."""

    def __init__(self, memory: PeerMemory, *, two_shot_bytes: int = 512 << 10):
        self.mem = memory
        self.rank, self.size, self.layout = memory.rank, memory.size, memory.layout
        self.two_shot_bytes = two_shot_bytes
        regions = self.layout.regions()
        self._views = {name: [a[off:off + n] for a in memory.arenas] for name, (off, n) in regions.items()}
        self.peers = [r for r in range(self.size) if r != self.rank]
        self.calls = 0                                   # operations run through the protocol

    # ------------------------------------------------------------------ channels
    def _fi(self, channel, which, rank):
        return self.layout.flag_index(channel, which, rank)

    def _produce_begin(self, channel: int) -> None:
        for q in self.peers:
            self.mem.wait(self._fi(channel, EMPTY, q), 1, f"rank {q} to release channel {channel}")
            self.mem.signal(self.rank, self._fi(channel, EMPTY, q), 0)

    def _produce_end(self, channel: int) -> None:
        for q in self.peers:
            self.mem.signal(q, self._fi(channel, FULL, self.rank), 1)

    def _consume_begin(self, channel: int) -> None:
        for p in self.peers:
            self.mem.wait(self._fi(channel, FULL, p), 1, f"rank {p} to fill channel {channel}")
            self.mem.signal(self.rank, self._fi(channel, FULL, p), 0)

    def _consume_end(self, channel: int) -> None:
        for p in self.peers:
            self.mem.signal(p, self._fi(channel, EMPTY, self.rank), 1)

    def _typed(self, region: str, rank: int, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        item = torch.empty(0, dtype=dtype).element_size()
        raw = self._views[region][rank][offset * item:(offset + numel) * item]
        return raw.view(dtype)

    # ------------------------------------------------------------------ all-reduce
    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.layout.ar_bytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group (a new tensor, x's dtype)."""
        if not self.fits(x):
            raise ValueError(f"all-reduce of {x.numel() * x.element_size()} bytes exceeds the arena's "
                             f"{self.layout.ar_bytes} (ar_bytes)")
        self.calls += 1
        if x.numel() * x.element_size() > self.two_shot_bytes and self.size > 1:
            return self._two_shot(x)
        out = torch.empty_like(x)
        srcs = self._one_shot_begin(x)
        self.mem.reduce(srcs, out.view(-1))
        self._consume_end(AR_IN)
        return out

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + sum(x), rmsnorm(residual + sum(x)) * weight), one pass over the peers' copies."""
        if not self.fits(x):
            raise ValueError(f"all-reduce of {x.numel() * x.element_size()} bytes exceeds the arena's "
                             f"{self.layout.ar_bytes} (ar_bytes)")
        self.calls += 1
        H = x.shape[-1]
        new_res = torch.empty_like(residual)
        normed = torch.empty_like(residual)
        srcs = [s.view(-1, H) for s in self._one_shot_begin(x)]
        self.mem.reduce(srcs, new_res.view(-1, H), residual.reshape(-1, H), weight, eps, normed.view(-1, H))
        self._consume_end(AR_IN)
        return new_res, normed

    def _one_shot_begin(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = x.numel()
        self._produce_begin(AR_IN)
        self.mem.copy(self._typed("ar_in", self.rank, x.dtype, n), x.reshape(-1))
        self._produce_end(AR_IN)
        self._consume_begin(AR_IN)
        return [self._typed("ar_in", r, x.dtype, n) for r in range(self.size)]

    def _two_shot(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        step = math.ceil(n / self.size)
        lo, hi = min(n, self.rank * step), min(n, (self.rank + 1) * step)
        srcs = self._one_shot_begin(x)
        self._produce_begin(AR_RED)
        if hi > lo:
            self.mem.reduce([s[lo:hi] for s in srcs], self._typed("ar_red", self.rank, x.dtype, hi - lo, lo))
        self._consume_end(AR_IN)
        self._produce_end(AR_RED)
        self._consume_begin(AR_RED)
        out = torch.empty_like(x).view(-1)
        for r in range(self.size):
            a, b = min(n, r * step), min(n, (r + 1) * step)
            if b > a:
                self.mem.copy(out[a:b], self._typed("ar_red", r, x.dtype, b - a, a))
        self._consume_end(AR_RED)
        return out.view_as(x)

    # ------------------------------------------------------------------ DEP
    def dep_rows(self, bucket: int, top_k: int, experts_per_rank: int) -> int:
        """Pairs one source can send one owner for a batch of `bucket` tokens (the slot size used)."""
        rows = bucket * min(top_k, experts_per_rank)
        if rows > self.layout.dep_slot_rows:
            raise ValueError(f"batch bucket {bucket} needs {rows} rows per DEP slot; the arena holds "
                             f"{self.layout.dep_slot_rows} (dep_slot_rows)")
        return rows

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, owner: torch.Tensor,
                 sentinel: int, rows: int, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Send every (token, k) pair to its expert's owner. Returns this rank's received pairs
        (x [size*rows, H], ids [size*rows, 1], weights [size*rows, 1]; padding rows carry `sentinel`)
        and the routing state `combine` needs. No host sync (shapes depend only on `rows`)."""
        self.calls += 1
        T, k = ids.shape
        H = x.shape[1]
        N = self.size
        flat = ids.reshape(-1)
        dest = owner[flat]                                              # [T*k]
        order = torch.argsort(dest, stable=True)
        counts = (dest.unsqueeze(1) == torch.arange(N, device=x.device)).sum(0)   # bincount would sync
        starts = torch.cumsum(counts, 0) - counts                       # prefix sum: first pair per owner
        pos_sorted = torch.arange(T * k, device=x.device) - starts[dest[order]]
        pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)   # slot row of pair (t, k)
        packed = torch.zeros(N, rows, H + 2, device=x.device, dtype=wire)
        packed[:, :, H] = sentinel
        if x.device.type == "cpu" and T and int(counts.max()) > rows:   # the host knows: refuse, never drop
            raise ValueError(f"{int(counts.max())} pairs for one owner exceed the DEP slot of {rows} rows")
        slot_row = dest * rows + pos
        pk = packed.view(N * rows, H + 2)
        pk[slot_row, :H] = x.repeat_interleave(k, 0).to(wire)
        pk[slot_row, H] = flat.to(wire)
        pk[slot_row, H + 1] = weights.reshape(-1).to(wire)
        slot_elems = rows * (H + 2)
        cap_elems = self.layout.dep_slot_rows * (H + 2)
        self._produce_begin(DISPATCH)
        for d in range(N):                            # into owner d's receive slot [self.rank]
            self.mem.copy(self._typed("recv", d, wire, slot_elems, self.rank * cap_elems), packed[d].view(-1))
        self._produce_end(DISPATCH)
        self._consume_begin(DISPATCH)
        recv = torch.empty(N, rows, H + 2, device=x.device, dtype=wire)
        for s in range(N):
            recv[s].view(-1).copy_(self._typed("recv", self.rank, wire, slot_elems, s * cap_elems))
        self._consume_end(DISPATCH)
        recv = recv.view(N * rows, H + 2)
        r_ids = recv[:, H].float().round().long().unsqueeze(1)
        state = {"dest": dest, "pos": pos, "T": T, "k": k, "rows": rows, "wire": wire, "dtype": x.dtype}
        return recv[:, :H].to(x.dtype), r_ids, recv[:, H + 1].float().unsqueeze(1), state

    def combine(self, y: torch.Tensor, state: dict) -> torch.Tensor:
        """Return the owners' results to the pairs' sources; each token sums its k results in fp32."""
        N, rows, wire, H = self.size, state["rows"], state["wire"], y.shape[1]
        ret_elems = rows * H
        cap_elems = self.layout.dep_slot_rows * H
        yw = y.to(wire).view(N, rows, H)
        self._produce_begin(COMBINE)
        for s in range(N):                            # into source s's return slot [self.rank]
            self.mem.copy(self._typed("ret", s, wire, ret_elems, self.rank * cap_elems), yw[s].reshape(-1))
        self._produce_end(COMBINE)
        self._consume_begin(COMBINE)
        back = torch.empty(N, rows, H, device=y.device, dtype=wire)
        for d in range(N):
            back[d].view(-1).copy_(self._typed("ret", self.rank, wire, ret_elems, d * cap_elems))
        self._consume_end(COMBINE)
        T, k = state["T"], state["k"]
        vals = back.view(N * rows, H)[state["dest"] * rows + state["pos"]].view(T, k, H)
        return vals.float().sum(1).to(state["dtype"])

    def close(self) -> None:
        self._views = {}
        self.mem.close()


def exchange_ready(store, prefix: str, rank: int, size: int, timeout: float) -> None:
    """Start-up barrier over the group's key/value store (after every rank initialised its flags)."""
    store.set(f"{prefix}/ready/{rank}", "1")
    for r in range(size):
        _store_get(store, f"{prefix}/ready/{r}", timeout)


def _store_get(store, key: str, timeout: float) -> str:
    try:
        v = store.get(key, timeout) if _takes_timeout(store) else store.get(key)
    except Exception as exc:
        raise TimeoutError(f"peer memory set-up: no value for {key} ({exc})") from None
    return v.decode() if isinstance(v, (bytes, bytearray)) else v


def _takes_timeout(store) -> bool:
    import inspect

    try:
        return len(inspect.signature(store.get).parameters) >= 2
    except (TypeError, ValueError):
        return False
