"""Multi-adapter benchmark (shrink, expand, fused multi_lora_linear): `lora-ops bench --ops
shrink,expand,multi_lora_linear` with any extra options.

    python benchmarks/bench_multi_lora.py                       # cpu suite on CPU, gpu suite on CUDA
    python benchmarks/bench_multi_lora.py --shape T=64,U=16,K=2048,N=2048,r=16,dist=zipf:1.5 --dtype fp32
"""
import sys

from lora_ops.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "shrink,expand,multi_lora_linear", *sys.argv[1:]]))
