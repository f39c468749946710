"""Native kernels XLA does not give us, behind XLA:CPU custom calls (amx.py: bf16 matmuls on
weights packed once)."""
