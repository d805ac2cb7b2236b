"""Test-wide settings: the tests use tiny tensors, for which one thread is fastest and does not
contend with other processes on a small machine."""
import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory: pytest.TempPathFactory):
    """One smoke-scale study folder: main (2 seeds), inside on main's cells, sharpness,
    geometry and transfer on sharpness's cells."""
    from vitsam.study.presets import get_study
    from vitsam.study.runner import run_study

    out = tmp_path_factory.mktemp("study")
    run_study(get_study("main"), "smoke", out, seeds=(0, 1), progress=False)
    run_study(get_study("inside"), "smoke", out, seeds=(0, 1), progress=False)
    run_study(get_study("sharpness"), "smoke", out, seeds=(0,), progress=False)
    run_study(get_study("geometry"), "smoke", out, seeds=(0,), progress=False)
    run_study(get_study("transfer"), "smoke", out, seeds=(0,), progress=False)
    return out
