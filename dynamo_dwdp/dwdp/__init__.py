"""DWDP: routed experts partitioned across the ranks of a group and pulled one-sidedly from peers.

placement   (policy)    who stores which experts, who pulls what from whom
transport   (mechanism) local shard storage, peer views, copy engines (CPU shm / CUDA IPC)
buffer      (mechanism) the two prefetch slots (slot = MoE layer parity), pre/post banks
manager     (mechanism) per-layer prefetch one layer ahead, events, routed-only pulls
executor    the MoEExecutor that ties them together; no collective, no barrier in forward
"""
