"""The dpcompile compiler: capture, sample-dimension analysis, per-sample rules, clipping, lowering."""
