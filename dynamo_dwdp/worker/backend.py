"""`DwdpWorkerEngine`: this project's engine on Dynamo's unified backend SDK (`LLMEngine` + `run`).

One instance = one rank of one pool. Every DWDP/DEP/DP rank is its own Dynamo worker (own endpoint
instance, own KV pool), so the router balances across ranks; a TP group registers rank 0 only.
Roles: agg (generate), prefill (compute the prompt, hold its KV blocks, hand back NIXL block
descriptors in `disaggregated_params`), decode (pull the blocks into its own pool, then generate
every output token itself, the first one included).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from typing import Any

from dynamo._core import Context
from dynamo.common.backend.engine import EngineConfig, LLMEngine, LlmRegistration
from dynamo.common.backend.health_check import build_health_check_payload, is_probe
from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
from dynamo.common.backend.worker import WorkerConfig
from dynamo.common.constants import DisaggregationMode
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

from dynamo_dwdp.engine.async_engine import AsyncEngine, EngineBroken
from dynamo_dwdp.rank.build import build_rank_engine
from dynamo_dwdp.worker.discovery_guard import DiscoveryGuard
from dynamo_dwdp.worker.kv_transfer import KvTransferError, NixlKvTransfer
from dynamo_dwdp.worker.local_kv import LocalKvTransfer
from dynamo_dwdp.errors import RequestError, UserError
from dynamo_dwdp.worker.args import WorkerArgs, parse_worker_args
from dynamo_dwdp.worker.handlers import chunk_from_output, prefill_params, sampling_from_request
from dynamo_dwdp.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

MODES = {"agg": DisaggregationMode.AGGREGATED, "prefill": DisaggregationMode.PREFILL,
         "decode": DisaggregationMode.DECODE}


class DwdpWorkerEngine(LLMEngine):
    def __init__(self, args: WorkerArgs):
        self.args = args
        self.mode = args.mode
        self.rank_engine = None
        self.ae: AsyncEngine | None = None
        self.kv = None
        self.snapshots = None
        self.guard = None
        self._last_snapshot = 0.0
        self._last_refresh = 0.0
        self.metrics = WorkerMetrics(args.group.strategy, args.mode, args.group.name, args.group.rank)
        self._generated = self.metrics.generated.labels(**self.metrics.labels)     # per chunk: no label lookup

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def from_args(cls, argv: list[str] | None = None):
        args = parse_worker_args(argv)
        engine = cls(args)
        cfg = WorkerConfig(
            namespace=args.namespace, component=args.component, endpoint="generate", model_name=args.model_path,
            served_model_name=args.served_model_name, discovery_backend=args.discovery_backend,
            request_plane=args.request_plane, event_plane=args.event_plane, disaggregation_mode=MODES[args.mode],
            enable_local_indexer=args.mode != "decode",
            metrics_labels=[("dwdp_strategy", args.group.strategy), ("dwdp_rank", str(args.group.rank))],
        )
        return engine, cfg

    async def start(self, worker_id: int) -> EngineConfig:
        a = self.args
        self.rank_engine = await asyncio.to_thread(build_rank_engine, a.model_path, a.engine, a.group, a.dwdp,
                                                   a.nats_url, a.expert_skew)
        engine = self.rank_engine.engine
        kv_name = f"dwdp-{a.group.name}-r{a.group.rank}-{worker_id:x}"
        if a.kv_transfer == "nixl" and self.mode != "agg":
            self.kv = NixlKvTransfer(self.rank_engine.runner.kv_pool, name=kv_name, hold_timeout=a.kv_hold_timeout)
        elif a.kv_transfer == "local" and self.mode != "agg":
            self.kv = LocalKvTransfer(self.rank_engine.runner.kv_pool, name=kv_name, hold_timeout=a.kv_hold_timeout,
                                      export=self.mode == "prefill")
        elif self.mode != "agg":
            raise UserError(f"--disaggregation-mode {self.mode} needs --kv-transfer nixl or local")
        self.ae = AsyncEngine(self.rank_engine)
        self.ae.on_step.append(self._after_step)
        self.ae.on_broken.append(self._on_broken)
        self.ae.on_recovered.append(self._on_recovered)
        self.ae.start()
        self.metrics.set_health(True)
        self.guard = DiscoveryGuard.for_env(worker_id)
        if self.guard is not None:
            self.guard.start()
        self._report_restart_recovery()
        log.info("dwdp worker ready: %s rank %d/%d (%s, %s), worker_id %x", a.group.name, a.group.rank,
                 a.group.size, a.group.strategy, self.mode, worker_id)
        return EngineConfig(
            model=a.model_path, served_model_name=a.served_model_name,
            llm=LlmRegistration(context_length=engine.max_model_len, kv_cache_block_size=a.engine.block_size,
                                total_kv_blocks=a.engine.num_kv_blocks, max_num_seqs=a.engine.max_num_seqs,
                                max_num_batched_tokens=a.engine.max_num_batched_tokens),
        )

    def _report_restart_recovery(self) -> None:
        """This rank is part of a group the supervisor restarted after a failure (DWDP_GROUP_FAILED_AT,
        wall-clock seconds): log and export the time to recovery."""
        failed_at = os.environ.get("DWDP_GROUP_FAILED_AT")
        if not failed_at:
            return
        seconds = max(0.0, time.time() - float(failed_at))
        self.metrics.recovered(seconds)
        log.warning("group %s recovered: rank %d serving again %.1fs after the failure (group restart %s)",
                    self.args.group.name, self.args.group.rank, seconds, os.environ.get("DWDP_GROUP_GENERATION", "?"))

    def _on_broken(self, reason: str) -> None:
        """Engine thread: the group broke. DWDP/DP wait to heal in place; DEP/TP stop this process (the
        Dynamo worker unregisters, fails what is left), so the rank supervisor re-forms the group."""
        self.metrics.set_health(False)
        group = self.rank_engine.group
        if not group.heals_in_place:
            log.error("group %s broke (%s): stopping this rank so the group restarts", group.name, reason)
            os.kill(os.getpid(), signal.SIGTERM)

    def _on_recovered(self, seconds: float) -> None:
        self.metrics.set_health(True)
        self.metrics.recovered(seconds)
        log.warning("group %s recovered in place: rank %d serving again %.1fs after it broke",
                    self.rank_engine.group.name, self.rank_engine.group.rank, seconds)

    def _after_step(self) -> None:
        """On the engine thread after every iteration: release read KV, refresh metrics, snapshots."""
        engine = self.rank_engine.engine
        if self.kv is not None and self.mode == "prefill" and self.kv.num_held:
            done, expired = self.kv.poll_done()
            for rid in done + expired:
                engine.release(rid)
            if expired:
                log.warning("prefill: KV of %d request(s) not read by a decode worker in %.0fs; freed: %s",
                            len(expired), self.kv.hold_timeout, expired)
        now = time.monotonic()
        if now - self._last_refresh >= 0.05:           # metrics are scraped in seconds: not every step
            self._last_refresh = now
            self.metrics.refresh(self.rank_engine.stats, engine, self.rank_engine.group)
            if self.kv is not None:
                self.metrics.kv_blocks_held.labels(**self.metrics.labels).set(self.kv.num_held)
        if self.snapshots is not None and now - self._last_snapshot > 0.5:
            self._last_snapshot = now
            blocks = engine.blocks
            hit = blocks.hits / blocks.queries if blocks.queries else None
            self.snapshots.publish(0, ComponentSnapshot(kv_used_blocks=blocks.num_used, kv_total_blocks=blocks.num_blocks,
                                                        gpu_cache_usage=blocks.num_used / blocks.num_blocks, dp_rank=0,
                                                        kv_cache_hit_rate=hit))

    async def cleanup(self) -> None:
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        if self.ae is not None:
            await asyncio.to_thread(self.ae.stop)
            self.ae = None
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        if self.rank_engine is not None:
            re, self.rank_engine = self.rank_engine, None
            await asyncio.to_thread(re.close)

    async def is_quiescent(self):
        if self.kv is None:
            return True
        return self.kv.num_held == 0

    async def abort(self, context: Context) -> None:
        if self.ae is not None:
            self.ae.abort(_request_id(context))

    # ------------------------------------------------------------------ Dynamo hooks
    async def kv_event_sources(self):
        if self.mode == "decode":
            return []
        return [PushSource(on_ready=self._on_kv_publisher, dp_rank=0)]

    def _on_kv_publisher(self, publisher) -> None:
        blocks = self.rank_engine.engine.blocks
        bs = blocks.block_size

        def stored(block_hash: int, parent: int | None, tokens: list[int]) -> None:
            publisher.publish_stored(token_ids=list(tokens), num_block_tokens=[bs], block_hashes=[block_hash],
                                     parent_hash=parent)

        def removed(hashes: list[int]) -> None:
            publisher.publish_removed(block_hashes=list(hashes))

        blocks.on_stored, blocks.on_removed = stored, removed

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher: Any) -> None:
        self.snapshots = publisher

    async def register_prometheus(self, metrics) -> None:
        from dynamo.common.backend.metrics import register_engine_registry

        register_engine_registry(metrics, self.metrics.registry)

    async def health_check_payload(self):
        bos = self.rank_engine.runner.model_config.bos_token_id if self.rank_engine else None
        return build_health_check_payload(int(bos or 0))

    # ------------------------------------------------------------------ requests
    async def generate(self, request: dict, context: Context):
        rid = _request_id(context)
        ae = self.ae
        if ae is None:
            raise EngineShutdown("engine is not running")
        try:
            prompt = [int(t) for t in request.get("token_ids") or []]
            params = sampling_from_request(request, self.rank_engine.engine.max_model_len)
            if is_probe(request) or self.mode == "agg":
                stream = ae.generate(rid, prompt, params)
            elif self.mode == "prefill":
                params.max_tokens, params.min_tokens = 1, 0
                stream = self._prefill(rid, prompt, params)
            else:
                stream = await self._decode(rid, request, prompt, params)
            async for out in stream:
                if isinstance(out, dict):            # prefill terminal chunk (with disaggregated_params)
                    yield out
                    continue
                if out.error:
                    self.metrics.requests.labels(**self.metrics.labels, outcome="error").inc()
                    raise EngineShutdown(out.error)
                self._generated.inc(len(out.new_token_ids))
                if out.finished:
                    self.metrics.requests.labels(**self.metrics.labels, outcome=out.finish_reason or "stop").inc()
                yield chunk_from_output(out)
                if context.is_stopped() and not out.finished:
                    ae.abort(rid)
                    return
        except (RequestError, UserError) as exc:
            self.metrics.requests.labels(**self.metrics.labels, outcome="rejected").inc()
            self._decline(request)
            raise InvalidArgument(str(exc)) from None
        except EngineBroken as exc:
            raise EngineShutdown(f"this worker's group is broken: {exc}") from None

    async def _prefill(self, rid: str, prompt: list[int], params):
        ae = self.ae
        async for out in ae.generate(rid, prompt, params, hold_kv=True):
            if not out.finished or out.error:
                yield out
                continue
            kv = self.kv

            def describe(engine):
                blocks = engine.held_blocks(rid)
                return kv.describe(rid, blocks, len(prompt))

            try:
                dp = await ae.call(describe)
            except KeyError:                    # aborted meanwhile: nothing held
                dp = {}
            chunk = chunk_from_output(out)
            if dp:
                dp["cached_tokens"] = out.num_cached_tokens
            chunk["disaggregated_params"] = dp
            yield chunk

    async def _decode(self, rid: str, request: dict, prompt: list[int], params):
        ae = self.ae
        dp = prefill_params(request)
        if int(dp.get("num_tokens", -1)) != len(prompt):
            raise RequestError(f"prefill described {dp.get('num_tokens')} tokens, the request has {len(prompt)}")
        blocks = await ae.call(lambda engine: engine.reserve(rid, prompt, params))
        t0 = time.perf_counter()
        try:
            moved = await self.kv.pull(dp, blocks)
        except KvTransferError as exc:
            self.metrics.kv_failures.labels(**self.metrics.labels).inc()
            await ae.call(lambda engine: engine.release(rid))
            self._decline(request)
            raise EngineShutdown(f"KV transfer from the prefill worker failed: {exc}") from None
        except BaseException:
            await ae.call(lambda engine: engine.release(rid))
            self._decline(request)
            raise
        self.metrics.kv_seconds.labels(**self.metrics.labels).observe(time.perf_counter() - t0)
        self.metrics.kv_bytes.labels(**self.metrics.labels).inc(moved)
        runner = self.rank_engine.runner
        if hasattr(runner, "write_kv_blocks"):          # TP: followers need the same blocks
            await ae.call(lambda engine: runner.write_kv_blocks(blocks, runner.kv_pool[blocks].clone()))
        return ae.generate(rid, None, None, prefilled=True, cached_tokens=int(dp.get("cached_tokens") or 0))

    def _decline(self, request: dict) -> None:
        """Decode role, request failed before (or during) its KV read: let the prefill worker free
        the blocks it holds for it now instead of at its hold timeout."""
        if self.mode != "decode" or self.kv is None:
            return
        dp = (request.get("prefill_result") or {}).get("disaggregated_params")
        if isinstance(dp, dict) and dp.get("kv") == self.kv.kind:
            self.kv.decline(dp)


def _request_id(context: Context) -> str:
    try:
        rid = context.id()
    except Exception:
        rid = None
    return rid or uuid.uuid4().hex
