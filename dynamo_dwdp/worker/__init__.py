"""The Dynamo worker (`python -m dynamo_dwdp`): one rank of one pool on the unified backend SDK.

args      flags (the launcher/k8s build them from launch/command_lines.py WORKER_FLAGS)
engine    the `dynamo.common.backend.LLMEngine` subclass: lifecycle, registration, KV events
handlers  request <-> engine translation per role (agg / prefill / decode)
kv_transfer  NIXL prefill -> decode hand-off
metrics   `dwdp_*` Prometheus families
main      entry point (TP followers run without a Dynamo endpoint)
"""
