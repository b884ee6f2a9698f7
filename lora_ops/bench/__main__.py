import sys

from lora_ops.bench.cli import main

sys.exit(main())
