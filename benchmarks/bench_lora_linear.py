"""Single-adapter LoRA linear benchmark: `lora-ops bench --ops lora_linear` with any extra options.

    python benchmarks/bench_lora_linear.py                      # cpu suite on CPU, gpu suite on CUDA
    python benchmarks/bench_lora_linear.py --suite full --out-dir benchmarks/results
    python benchmarks/bench_lora_linear.py --shape M=16,K=4096,N=4096,r=16 --dtype bf16
"""
import sys

from lora_ops.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "lora_linear", *sys.argv[1:]]))
