"""The prefill-size MoE/MLP kernels and the concatenation-free SDPA prefill on the GPU: new path vs the
old torch path (rel. errors in fp32 and bf16 against float64 / fp32 references) and one layer's time
each way, then the v2-lite-shape model's prefill logits (bf16, new and old expert/MLP paths) against
the fp32 model. Optionally writes the 27-layer v2-lite-shape model for `gpu_profile.py --model`.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_moe_prefill.py --out OUT [--write-model DIR]

Writes OUT/moe_prefill.json; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.nn.functional as F

from gpu_perf import median_ms, say, write_v2lite

ROWS: list[tuple[str, str]] = []
RESULTS: dict = {}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def note(name: str, value: str) -> None:
    ROWS.append((name, value))
    say(f"{name}: {value}")


def check_kernels(g: torch.Generator) -> None:
    from dynamo_dwdp.model.kernels import moe_prefill

    rows, inter = 49152, 1408                          # 8K tokens x top-6, v2-lite expert width
    for dtype in (torch.float32, torch.bfloat16):
        h = (torch.randn(rows, 2 * inter, device="cuda", generator=g) * 2).to(dtype)
        ref = F.silu(h[:, :inter].double()) * h[:, inter:].double()
        new, old = moe_prefill.swiglu(h), F.silu(h[:, :inter]) * h[:, inter:]
        note(f"swiglu {dtype} vs fp64 (new / old torch ops)", f"{rel(new, ref):.2e} / {rel(old, ref):.2e}")
        if dtype == torch.bfloat16:
            t_new = median_ms(lambda: moe_prefill.swiglu(h))
            t_old = median_ms(lambda: F.silu(h[:, :inter]) * h[:, inter:])
            note("swiglu 49152x2816 bf16 ms (new / old)", f"{t_new:.3f} / {t_old:.3f}")
            RESULTS["swiglu_ms"] = {"new": t_new, "old": t_old}
    T, k, H = 8192, 6, 2048
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(T * k, H, device="cuda", generator=g).to(dtype)
        order = torch.randperm(T * k, device="cuda", generator=g)
        held = torch.rand(T * k, device="cuda", generator=g) > 0.1
        pos = torch.where(held, torch.arange(T * k, device="cuda"), -1).to(torch.int32)
        pos = torch.empty_like(pos).scatter_(0, order, pos).view(T, k)
        w = torch.rand(T, k, device="cuda", generator=g)
        yp = torch.where((pos >= 0).view(-1, 1), y[pos.view(-1).clamp(min=0).long()].double(), 0.0).view(T, k, H)
        ref = (w.double().unsqueeze(-1) * yp).sum(1)

        def old_combine():
            y_sorted = torch.where(held.unsqueeze(1), y, 0.0)
            y_pairs = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
            return torch.bmm(w.to(dtype).view(T, 1, k), y_pairs.view(T, k, -1)).view(T, -1)

        new = moe_prefill.combine(y, pos, w)
        note(f"combine {dtype} vs fp64 (new / old torch ops)", f"{rel(new, ref):.2e} / {rel(old_combine(), ref):.2e}")
        if dtype == torch.bfloat16:
            t_new = median_ms(lambda: moe_prefill.combine(y, pos, w))
            t_old = median_ms(old_combine)
            note("combine 8192x6x2048 bf16 ms (new / old)", f"{t_new:.3f} / {t_old:.3f}")
            RESULTS["combine_ms"] = {"new": t_new, "old": t_old}


def check_experts(g: torch.Generator) -> None:
    from dynamo_dwdp.model import experts
    from dynamo_dwdp.model.experts import ExpertBank, routed_experts, routed_experts_grouped

    E, H, inter, k = 64, 2048, 1408, 6
    w13 = torch.randn(E, 2 * inter, H, device="cuda", generator=g).bfloat16() * 0.02
    w2 = torch.randn(E, H, inter, device="cuda", generator=g).bfloat16() * 0.02
    for T in (8192, 16000):
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices
        w = torch.rand(T, k, device="cuda", generator=g)
        for name, cuts in (("one bank", [(0, 64)]), ("two banks", [(0, 24), (24, 40)]), ("subset 0..39", [(0, 40)])):
            if T != 8192 and name != "one bank":
                continue
            banks = [ExpertBank(f, w13[f:f + n], w2[f:f + n]) for f, n in cuts]
            ref = routed_experts(x.float(), ids, w, [ExpertBank(b.first, b.w13.float(), b.w2.float()) for b in banks])
            experts.use_prefill_kernels = lambda x: True
            new = routed_experts_grouped(x, ids, w, banks)
            t_new = median_ms(lambda: routed_experts_grouped(x, ids, w, banks), reps=10)
            experts.use_prefill_kernels = lambda x: False
            old = routed_experts_grouped(x, ids, w, banks)
            t_old = median_ms(lambda: routed_experts_grouped(x, ids, w, banks), reps=10)
            experts.use_prefill_kernels = lambda x: x.is_cuda
            note(f"experts {T} tok {name}: rel vs fp32 loop (new / old), new vs old",
                 f"{rel(new, ref):.2e} / {rel(old, ref):.2e}, {rel(new, old):.2e}")
            note(f"experts {T} tok {name}: ms per layer (new / old)", f"{t_new:.3f} / {t_old:.3f}")
            RESULTS[f"experts_{T}_{name}"] = {"rel_new": rel(new, ref), "rel_old": rel(old, ref),
                                              "ms_new": t_new, "ms_old": t_old}


def check_attention(g: torch.Generator) -> None:
    from dynamo_dwdp.model.attention import sdpa_prefill_attention
    from dynamo_dwdp.model.batch import ForwardBatch

    h, N, R, V, C, bs = 16, 128, 64, 128, 512, 16
    for lens, cached in (([8192], [0]), ([3000, 1000], [0, 2000])):
        T = sum(lens)
        ctx = [c + n for c, n in zip(cached, lens)]
        blocks = [(c + bs - 1) // bs for c in ctx]
        perm = torch.randperm(sum(blocks), generator=torch.Generator().manual_seed(1)).tolist()
        tables, at = [], 0
        for b in blocks:
            tables.append(perm[at:at + b])
            at += b
        batch = ForwardBatch.build([[1] * n for n in lens], cached, tables, bs, [True] * len(lens), device="cuda")
        pool = torch.randn(sum(blocks), bs, C + R, device="cuda", generator=g)
        wkv = torch.randn(h, N + V, C, device="cuda", generator=g) / C ** 0.5
        q = torch.randn(T, h, N + R, device="cuda", generator=g)
        ref = sdpa_prefill_attention(q[..., :N].double(), q[..., N:].double(), batch, pool.double(),
                                     wkv[:, :N].double(), wkv[:, N:].double(), (N + R) ** -0.5) if T <= 4000 else None
        for dtype in (torch.float32, torch.bfloat16):
            qq, pp, ww = q.to(dtype), pool.to(dtype), wkv.to(dtype)
            args = (qq[..., :N], qq[..., N:], batch, pp, ww[:, :N], ww[:, N:], (N + R) ** -0.5)
            whole = sdpa_prefill_attention(*args, q_whole=qq)
            cat = sdpa_prefill_attention(*args)
            line = f"new vs cat path {rel(whole, cat):.2e}"
            if ref is not None:
                line += f"; vs fp64: new {rel(whole, ref):.2e}, cat {rel(cat, ref):.2e}"
            note(f"sdpa prefill {lens} after {cached} {dtype}", line)
            if dtype == torch.bfloat16 and len(lens) == 1:
                t_new = median_ms(lambda: sdpa_prefill_attention(*args, q_whole=qq), reps=10)
                t_cat = median_ms(lambda: sdpa_prefill_attention(*args), reps=10)
                note("sdpa prefill 8192 bf16 ms (q in place / q concatenated)", f"{t_new:.3f} / {t_cat:.3f}")


def check_model(g: torch.Generator, tmp: str) -> None:
    """v2-lite-shape, 3 layers: prefill logits of three sequences (one fresh 2048-token prompt; a
    1536 + 512 pair, the second after 1024 cached tokens) in bf16, new and old expert/MLP paths,
    against the fp32 model."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model import experts, layers
    from dynamo_dwdp.model.moe_executor import LocalExecutor
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    lite = os.path.join(tmp, "lite3")
    write_checkpoint(lite, "v2-lite-shape", seed=0, dtype="bf16", num_layers=3, quiet=True, device="cuda")
    prompts = [torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (2048, 1536, 1536)]
    tables = [list(range(0, 128)), list(range(128, 224)), list(range(224, 320))]

    def logits(dtype: str, old: bool) -> torch.Tensor:
        r = ModelRunner(lite, EngineSettings(block_size=16, num_kv_blocks=321, device="cuda", dtype=dtype,
                                             max_num_batched_tokens=4096), LocalExecutor)
        if old:
            experts.use_prefill_kernels = lambda x: False
            for mod in r.model.modules():
                if isinstance(mod, layers.DenseMLP):
                    mod.gate_up = None                        # the two-GEMM torch form
        try:
            r.execute([prompts[2][:1024]], [0], [tables[2]], [True])       # cached part of sequence 3
            out = r.execute([prompts[0], prompts[1], prompts[2][1024:]], [0, 0, 1024], tables, [True] * 3)
        finally:
            experts.use_prefill_kernels = lambda x: x.is_cuda
        del r
        torch.cuda.empty_cache()
        return out.float()

    ref = logits("float32", False)
    new, old = logits("bfloat16", False), logits("bfloat16", True)
    note("model 3 layers bf16 prefill logits vs fp32 model (new / old paths), new vs old",
         f"{rel(new, ref):.2e} / {rel(old, ref):.2e}, {rel(new, old):.2e}")
    RESULTS["model_logits"] = {"rel_new": rel(new, ref), "rel_old": rel(old, ref), "new_vs_old": rel(new, old)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--write-model", default="", help="also write the 27-layer v2-lite-shape model under DIR")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    tmp = tempfile.mkdtemp()
    if a.write_model:                                              # first: the profile after this needs it
        write_v2lite(a.write_model, 27)
    for step in (check_kernels, check_experts, check_attention, lambda g: check_model(g, tmp)):
        try:
            step(g)
        except Exception as exc:                                   # one failed step is a row, the rest still run
            note(getattr(step, "__name__", "step"), f"FAILED {type(exc).__name__}: {str(exc)[:300]}")
        with open(os.path.join(a.out, "moe_prefill.json"), "w") as f:
            json.dump({"rows": ROWS, "results": RESULTS}, f, indent=1)
    print("\n| check | result |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
