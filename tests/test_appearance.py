"""The colour's own hash grid (model.texture.appearance_grid): what the colour network sees,
that the colour loss trains it, and that its levels follow the step like the geometry's."""
import torch

from models.network import ColorNetwork
from systems.config import load_config

SMALL = [
    "dataset.root_dir=unused", "model.geometry.xyz_encoding.compile=false", "model.sampler.resolution=32",
    "model.geometry.xyz_encoding.n_levels=4", "model.geometry.xyz_encoding.log2_hashmap_size=12",
    "model.texture.xyz_encoding.n_levels=4", "model.texture.xyz_encoding.log2_hashmap_size=12",
    "model.texture.xyz_encoding.compile=false",
]


def texture_config(*overrides):
    return load_config("confs/neus-dtu-wmask-cpu.yaml", [*SMALL, *overrides]).model.texture


def test_without_the_grid_the_colour_sees_the_sdf_features_only():
    net = ColorNetwork(texture_config("model.texture.appearance_grid=false"), feature_dim=13)
    feature = torch.randn(5, 13)
    assert net.encoding is None
    assert net.point_features(torch.rand(5, 3), feature) is feature
    # 13 features + 16 spherical harmonics (degree 4) + 3 normal
    assert net.mlp[0].in_features == 32


def test_the_grid_adds_its_levels_to_the_colour_input():
    net = ColorNetwork(texture_config("model.texture.appearance_grid=true"), feature_dim=13)
    feature = torch.randn(5, 13)
    x01 = torch.rand(5, 3)
    out = net.point_features(x01, feature)
    assert out.shape == (5, 13 + 4 * 2)  # 4 levels of 2 features
    torch.testing.assert_close(out[:, :13], feature)
    torch.testing.assert_close(out[:, 13:], net.encoding(x01).float())
    assert net.mlp[0].in_features == 13 + 8 + 16 + 3
    rgb = net(out, torch.nn.functional.normalize(torch.randn(5, 3), dim=-1), torch.randn(5, 3))
    assert rgb.shape == (5, 3) and ((rgb > 0) & (rgb < 1)).all()


def test_the_colour_loss_trains_the_grid_and_its_levels_follow_the_step():
    from models.neus import NeuSModel

    config = load_config("confs/neus-dtu-wmask-cpu.yaml", [
        *SMALL, "model.texture.appearance_grid=true", "model.texture.xyz_encoding.start_level=2",
        "model.texture.xyz_encoding.update_steps=10"]).model
    torch.manual_seed(0)
    model = NeuSModel(config)
    grid = model.texture.encoding
    model.set_step(0)
    assert int(grid.current_level) == 2  # 2 of 4 levels at step 0, one more every 10 steps
    model.set_step(15)
    assert int(grid.current_level) == 3
    model.set_step(25)
    assert int(grid.current_level) == 4
    model.train()
    model.occupancy.update(0, model.occupancy_alpha)
    rays_o = torch.tensor([[0.0, 0.0, -2.0], [0.1, 0.2, -2.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = model(rays_o, rays_d, torch.zeros(2, 3))
    assert out["opacity"].min() > 0.5  # both rays hit the init sphere (radius 0.5)
    out["rgb"].sum().backward()
    grads = [p.grad for p in grid.parameters()]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
