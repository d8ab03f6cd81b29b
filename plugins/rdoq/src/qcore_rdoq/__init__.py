"""qcore-rdoq: rate-distortion optimal channel-group mixed precision (RDOQ), as a qcore plugin."""
