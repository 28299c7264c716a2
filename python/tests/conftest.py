import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def generator(request):
    """A fresh seed per test, printed so that a failure can be replayed (LONGATTN_TEST_SEED=...)."""
    seed = int(os.environ.get("LONGATTN_TEST_SEED", random.randrange(2**31)))
    print(f"{request.node.name}: seed {seed}")
    return torch.Generator().manual_seed(seed)
