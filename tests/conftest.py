import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and the block zoo are plain modules beside the tests

import torch  # noqa: E402

torch.set_num_threads(2)
