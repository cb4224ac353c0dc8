"""The op benchmarks (``tallytrain bench``): every op against the
plain-PyTorch way, as ratios and as fractions of the memory bandwidth
measured in the same run (docs/kernels.md). ``harness`` times and tabulates,
``ops`` holds the cases."""
