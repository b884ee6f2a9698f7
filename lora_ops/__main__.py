"""`python -m lora_ops`: the same command as the `lora-ops` console script."""
import sys

from lora_ops.cli import main

sys.exit(main())
