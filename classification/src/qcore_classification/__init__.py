"""qcore-classification."""
