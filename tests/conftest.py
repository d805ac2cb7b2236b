"""Test-wide settings: the tests use tiny tensors, for which one thread is fastest and does not
contend with other processes on a small machine."""
import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)
