"""qcore's own model zoo: architectures, training script, shipped weights."""
