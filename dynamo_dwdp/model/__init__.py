"""DeepSeek-V3 in PyTorch: config, layers (MLA, RMSNorm, RoPE/YaRN, MoE router), loader, checkpoint writer."""
