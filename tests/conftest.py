import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton GEMMs take their default configurations instead of timing every one on each new
# shape (minutes over this suite on a GPU); test_triton_kernels checks each configuration alone.
os.environ.setdefault("LORA_OPS_TRITON_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
