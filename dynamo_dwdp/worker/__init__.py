"""The Dynamo worker (`python -m dynamo_dwdp`): one rank of one pool on the unified backend SDK.

flags     the worker's flags, one table (the launcher and k8s build the argv from it, args the argparse)
args      parsed arguments: GroupSpec, EngineSettings, DwdpSettings, passed whole to the rank assembly
backend   the `dynamo.common.backend.LLMEngine` subclass: lifecycle, registration, KV events
handlers  request <-> engine translation per role (agg / prefill / decode)
kv_transfer  NIXL prefill -> decode hand-off
local_kv  the same hand-off when both workers share a host (CUDA IPC / shared memory + a loopback channel)
metrics   `dwdp_*` Prometheus families
main      entry point (TP followers run without a Dynamo endpoint)
"""
