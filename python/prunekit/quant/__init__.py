"""Weight quantization composed with pruning: a GPTQ-style min-max quantizer (quantizer.py) and joint
SparseGPT pruning + quantization (sparse_quant.py)."""
