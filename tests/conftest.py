"""Suite-wide settings: one torch thread (tiny models; the CI machine has 2 shared cores)."""

import torch

torch.set_num_threads(1)
