"""model.render_step_knots: the marching step follows a piecewise-constant schedule, is saved with
the model (renders after a reload match) and old checkpoints without it load at render_step_size."""
import pytest
import torch

from models.neus import check_step_knots, render_step_at
from systems.config import load_config
from utils.config import ConfigError

SMALL = [
    "dataset.root_dir=unused", "model.geometry.xyz_encoding.compile=false", "model.sampler.resolution=32",
    "model.geometry.xyz_encoding.n_levels=4", "model.geometry.xyz_encoding.log2_hashmap_size=12",
    "model.texture.appearance_grid=false", "model.render_step_size=0.04",
    "model.render_step_knots=[[100,0.02],[200,0.01]]",
]


def test_render_step_at_by_hand():
    knots = [[100, 0.02], [200, 0.01]]
    got = [render_step_at(step, 0.04, knots) for step in (0, 99, 100, 199, 200, 5000)]
    assert got == [0.04, 0.04, 0.02, 0.02, 0.01, 0.01]
    assert render_step_at(150, 0.04, []) == 0.04


def test_bad_step_knots_name_the_key():
    check_step_knots([[0, 0.1], [10, 0.05]])
    with pytest.raises(ConfigError, match=r"model.render_step_knots\[1\].*size > 0"):
        check_step_knots([[0, 0.1], [10, 0.0]])
    with pytest.raises(ConfigError, match="steps must increase"):
        check_step_knots([[10, 0.1], [10, 0.05]])
    from models.neus import NeuSModel

    config = load_config("confs/neus-dtu-wmask-cpu.yaml", ["dataset.root_dir=unused", "model.render_step_knots=[[5,-1]]"])
    with pytest.raises(ConfigError, match=r"model.render_step_knots\[0\]"):
        NeuSModel(config.model)


def make_model():
    from models.neus import NeuSModel

    torch.manual_seed(0)
    model = NeuSModel(load_config("confs/neus-dtu-wmask-cpu.yaml", SMALL).model)
    model.occupancy.update(0, model.occupancy_alpha)  # every cell occupied at the start
    return model.eval()


def samples_on_the_axis(model):
    # one ray through the centre, from z = -2 to 2 across the cube [-1, 1]^3: 2 / step samples
    with torch.no_grad():
        out = model(torch.tensor([[0.0, 0.0, -2.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3))
    return out["n_samples"]


def test_the_schedule_sets_the_marching_step_and_is_saved():
    model = make_model()
    assert model.step_size == 0.04  # before the first set_step: render_step_size
    counts = {}
    for step in (0, 150, 250):
        model.set_step(step)
        counts[step] = samples_on_the_axis(model)
    assert model.step_size == 0.01
    # the same stretch of the ray is marched (the occupied cells before the early stop: 20 steps of
    # 0.04 = 0.8 at the coarse step), at each step: about 2x and 4x the samples
    assert counts[0] == 20
    assert counts[150] == pytest.approx(2 * counts[0], abs=2)
    assert counts[250] == pytest.approx(4 * counts[0], rel=0.15)
    state = model.state_dict()
    assert float(state["render_step"]) == 0.01
    reloaded = make_model()
    reloaded.load_state_dict(state)
    assert reloaded.step_size == 0.01  # no set_step needed: a test stage after --resume renders alike
    old = {k: v for k, v in state.items() if k != "render_step"}  # a checkpoint from before the schedule
    before = make_model()
    before.set_step(250)
    before.load_state_dict(old)
    assert before.step_size == 0.04
