import math

import pytest
import torch
from torch import nn

from vitsam.eval import throughput as T


class FakeClock:
    """A clock that only moves when the model runs: each forward pass costs ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        return self.now

    def __deepcopy__(self, memo: dict) -> "FakeClock":
        return self  # a deep-copied model keeps ticking the same clock


class ClockedNet(nn.Module):
    def __init__(self, clock: FakeClock, num_classes: int = 3) -> None:
        super().__init__()
        self.clock = clock
        self.fc = nn.Linear(2 * 4 * 4, num_classes)
        self.batches: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.clock.step
        self.batches.append(tuple(x.shape))
        return self.fc(x.flatten(1))


def test_inference_counts_only_timed_repeats():
    clock = FakeClock(0.5)
    net = ClockedNet(clock).train()
    res = T.inference_throughput(net, batch_size=6, img_size=4, in_chans=2, warmup=3, repeats=4, timer=clock)
    # 4 timed batches of 6 images at 0.5 s each: 24 images / 2 s. Counting warm-up would give other numbers.
    assert res["images_per_s"] == pytest.approx(12.0)
    assert res["ms_per_batch"] == pytest.approx(500.0)
    assert res["images_per_s_per_core"] == pytest.approx(12.0 / torch.get_num_threads())
    assert res["settings"]["images_timed"] == 24 and res["settings"]["warmup"] == 3
    assert net.batches == [(6, 2, 4, 4)] * 7 and net.training


def test_training_counts_steps_and_sam_doubles_passes():
    torch.manual_seed(0)
    results = {}
    for sam in (False, True):
        clock = FakeClock(0.25)
        net = ClockedNet(clock)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        res = T.training_throughput(net, lambda p: torch.optim.SGD(p, lr=0.1), batch_size=8, img_size=4,
                                    in_chans=2, sam=sam, steps=3, warmup=1, timer=clock)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy was trained
        assert net.batches == []  # ... so the original never ran
        results[sam] = res
        assert res["settings"]["sam"] is sam and res["settings"]["images_timed"] == 24
    # Plain: one forward per step (0.25 s) -> 32 img/s; SAM: two forwards per step -> 16 img/s.
    assert results[False]["images_per_s"] == pytest.approx(32.0)
    assert results[True]["images_per_s"] == pytest.approx(16.0)


def test_threads_restored_and_bad_arguments():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    old = torch.get_num_threads()
    res = T.inference_throughput(net, 2, 4, threads=1, warmup=0, repeats=1)
    assert res["settings"]["threads"] == 1 and torch.get_num_threads() == old
    assert res["images_per_s"] > 0 and math.isfinite(res["images_per_s"])
    assert set(res) == {"images_per_s", "images_per_s_per_core", "ms_per_batch", "settings"}
    with pytest.raises(ValueError, match="batch_size"):
        T.inference_throughput(net, 0, 4)
    with pytest.raises(ValueError, match="repeats"):
        T.inference_throughput(net, 2, 4, repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            T.inference_throughput(net, 2, 4, device="cuda")
