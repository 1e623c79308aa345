"""The baseline strategies DWDP is compared with: DEP (expert-parallel all-to-all) and TP."""
