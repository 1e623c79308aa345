"""Roofline planner: which strategy should win on which hardware, and why (`dynamo-dwdp plan`)."""
