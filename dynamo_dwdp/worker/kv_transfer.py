"""Prefill -> decode KV hand-off over NIXL (UCX: RDMA/NVLink on GPU, cma/tcp on CPU).

Why raw NIXL instead of `dynamo.nixl_connect`: nixl_connect registers and deregisters every local
descriptor per operation; the contract here is "register the KV pool once, send block descriptors
per request", which it cannot express. The wire contract stays Dynamo's: everything the decode side
needs rides in the prefill's `disaggregated_params`.

Prefill side (`describe`): the pool is registered at start; a finished prefill's held blocks are
described as {agent, agent metadata, pool base, bytes per block, block ids, layout}; the request's
blocks stay held until the decode's READ notification arrives (`poll_done`) or `hold_timeout` passes.
Decode side (`pull`): reserve local blocks (block tables may differ), READ remote block i into local
block j as one descriptor each (the pool is block-major, so a block of all layers is contiguous),
wait, verify the layout matched. Any failure raises `KvTransferError`; the caller fails the request
and frees its reserved blocks. A decode request that fails before its READ sends the same
notification (`decline`) so the prefill frees at once; `hold_timeout` covers a decode that died.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
import zlib

import torch

log = logging.getLogger(__name__)


class KvTransferError(RuntimeError):
    pass


def _layout(pool: torch.Tensor) -> dict:
    return {"shape": list(pool.shape[1:]), "dtype": str(pool.dtype).replace("torch.", "")}


def remote_block_ids(params: dict, pool: torch.Tensor, local_blocks: list[int]) -> list[int]:
    """The block ids of a prefill's KV descriptor, checked against this decode's pool: the same layout
    (model, block size, dtype) and one remote block per local block; else KvTransferError."""
    if params.get("layout") != _layout(pool):
        raise KvTransferError(f"KV layout mismatch: prefill {params.get('layout')} vs decode {_layout(pool)} "
                              "(prefill and decode pools need the same model, block size and dtype)")
    remote_blocks = [int(b) for b in params["block_ids"]]
    if len(remote_blocks) != len(local_blocks):
        raise KvTransferError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local blocks")
    return remote_blocks


class NixlKvTransfer:
    kind = "nixl"                       # the `kv` value of the descriptors it writes and reads

    def __init__(self, kv_pool: torch.Tensor, name: str | None = None, hold_timeout: float = 60.0):
        from nixl._api import nixl_agent, nixl_agent_config

        self.pool = kv_pool
        self.name = name or f"dwdp-kv-{uuid.uuid4().hex[:12]}"
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=["UCX"]))
        self.mem_type = "VRAM" if kv_pool.is_cuda else "DRAM"
        self.dev_id = kv_pool.device.index or 0
        self.block_bytes = kv_pool[0].numel() * kv_pool.element_size()
        self.base = kv_pool.data_ptr()
        self.num_blocks = kv_pool.shape[0]
        self._reg = self.agent.register_memory(kv_pool)                 # once, for the pool's lifetime
        self._local_dlist = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", [(self.base + i * self.block_bytes, self.block_bytes, self.dev_id)
                                for i in range(self.num_blocks)], self.mem_type)
        meta = self.agent.get_agent_metadata()
        self._meta_b64 = base64.b64encode(zlib.compress(meta, 6)).decode()
        self._remotes: dict[str, tuple[object, int]] = {}              # agent -> (prepped dlist, num blocks)
        self.hold_timeout = hold_timeout
        self._held: dict[str, tuple[str, float]] = {}                  # notif key -> (request id, deadline)
        log.info("NIXL KV agent %s: pool %d blocks x %d B registered (%s)", self.name, self.num_blocks,
                 self.block_bytes, self.mem_type)

    # ------------------------------------------------------------------ prefill side
    def describe(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict:
        notif = f"{request_id}:{uuid.uuid4().hex[:8]}"
        self._held[notif] = (request_id, time.monotonic() + self.hold_timeout)
        return {
            "kv": "nixl", "agent": self.name, "agent_metadata": self._meta_b64, "pool_base": self.base,
            "pool_blocks": self.num_blocks, "block_bytes": self.block_bytes, "mem_type": self.mem_type,
            "dev_id": self.dev_id, "block_ids": list(block_ids), "num_tokens": num_tokens, "notif": notif,
            "layout": _layout(self.pool),
        }

    @property
    def num_held(self) -> int:
        return len(self._held)

    def poll_done(self) -> tuple[list[str], list[str]]:
        """(request ids whose blocks the decode side has read, request ids whose hold timed out)."""
        done, expired = [], []
        if not self._held:
            return done, expired
        for _agent, msgs in self.agent.get_new_notifs().items():
            for msg in msgs:
                entry = self._held.pop(msg.decode(errors="replace"), None)
                if entry is not None:
                    done.append(entry[0])
        now = time.monotonic()
        for notif, (rid, deadline) in list(self._held.items()):
            if now > deadline:
                del self._held[notif]
                expired.append(rid)
        return done, expired

    def forget(self, request_id: str) -> None:
        for notif, (rid, _) in list(self._held.items()):
            if rid == request_id:
                del self._held[notif]

    # ------------------------------------------------------------------ decode side
    def _remote(self, params: dict):
        name = params["agent"]
        if name not in self._remotes:
            meta = zlib.decompress(base64.b64decode(params["agent_metadata"]))
            added = self.agent.add_remote_agent(meta)
            name = added.decode() if isinstance(added, bytes) else added
            n, bb = int(params["pool_blocks"]), int(params["block_bytes"])
            base, dev = int(params["pool_base"]), int(params.get("dev_id", 0))
            dlist = self.agent.prep_xfer_dlist(name, [(base + i * bb, bb, dev) for i in range(n)],
                                               params.get("mem_type", "DRAM"))
            self._remotes[name] = (dlist, n)
        return name, self._remotes[name][0]

    def decline(self, params: dict) -> None:
        """The request will not READ its blocks (rejected, or the READ failed): send the prefill
        side the notification a finished READ carries, so it frees them now (best effort)."""
        try:
            name, _ = self._remote(params)
            self.agent.send_notif(name, params["notif"].encode())
        except Exception as exc:
            log.warning("could not tell %s to free the KV blocks of %s: %s", params.get("agent"), params.get("notif"),
                        exc)

    async def pull(self, params: dict, local_blocks: list[int], timeout: float = 30.0) -> int:
        """READ the described remote blocks into `local_blocks`; returns bytes moved."""
        if params.get("kv") != "nixl":
            raise KvTransferError(f"prefill result carries no NIXL KV descriptor (kv={params.get('kv')!r})")
        remote_blocks = remote_block_ids(params, self.pool, local_blocks)
        try:
            name, remote_dlist = self._remote(params)
            handle = self.agent.make_prepped_xfer("READ", self._local_dlist, local_blocks, remote_dlist,
                                                  remote_blocks, params["notif"].encode())
        except Exception as exc:
            raise KvTransferError(f"NIXL set-up with {params.get('agent')} failed: {exc}") from None
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout
            delay = 0.0005
            while state not in ("DONE",):
                if state == "ERR":
                    raise KvTransferError(f"NIXL READ from {name} failed (prefill worker gone?)")
                if time.monotonic() > deadline:
                    raise KvTransferError(f"NIXL READ from {name} timed out after {timeout:.0f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.01)
                state = self.agent.check_xfer_state(handle)
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:
                pass
        moved = len(local_blocks) * self.block_bytes
        return moved

    def close(self) -> None:
        try:
            for name in list(self._remotes):
                self.agent.remove_remote_agent(name)
            self.agent.deregister_memory(self._reg)
        except Exception:
            pass
