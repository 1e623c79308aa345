"""dynamo-dwdp: DWDP for MoE serving on NVIDIA Dynamo."""
__version__ = "0.1.0"
