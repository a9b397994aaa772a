"""Mixed precision (trainer.precision fp16-mixed): the grad scaler's skipped steps, its backoff
before any rollback, the SDF network kept float32 under autocast (CPU's bfloat16 autocast as a
stand-in), and, on CUDA only, a few fp16-mixed training steps and their checkpoint."""
import torch

from models.network import ColorNetwork, SDFNetwork
from tests.test_cuda_backends import needs_cuda
from tests.test_reliability import CPU_CONFIG, TINY, build_system
from utils.checkpoint import load_checkpoint
from systems.config import load_config

def test_a_non_finite_scaled_gradient_is_skipped_counted_and_lowers_the_scale(scene, tmp_path):
    """The grad-scaler path of a step, on CPU with an enabled CPU GradScaler: a step whose
    unscaled gradient is infinite leaves the parameters alone, is reported skipped and counted
    (like a NaN step) and halves the loss scale; the next step trains."""
    system = build_system(scene, tmp_path)
    system.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for _ in range(2):
        assert not system.step().skipped
    before = [p.detach().clone() for p in system.params]
    hook = system.model.variance.variance.register_hook(lambda g: g * float("inf"))
    result = system.step()
    hook.remove()
    assert result.skipped and result.scaler_backoff and "gradient" in result.non_finite and not result.stats.keys() - {"seconds_per_step"}
    assert system.scaler.get_scale() == 512.0
    for p, q in zip(system.params, before):
        assert torch.equal(p, q)
    assert system.skipped_steps == 1 and system.bad_steps_in_a_row == 0  # the scaler's to handle at 512
    assert not system.step().skipped


def test_float16_overflows_are_left_to_the_scaler_until_its_scale_is_below_one(scene, tmp_path):
    """Twelve steps with an infinite gradient (finite loss) from scale 1024: ten halvings take it to
    1 without counting towards a rollback (max_bad_steps 10); the 11th and 12th (scale 0.5, 0.25)
    count. A rollback goes on with the lower of the current and the checkpoint's scale, but not
    below 1; also for a scaler that never scaled a loss (every step's loss non-finite)."""
    system = build_system(scene, tmp_path)
    system.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    checkpoint_scale = system.scaler.get_scale()
    system.save()
    hook = system.model.variance.variance.register_hook(lambda g: g * float("inf"))
    for _ in range(12):
        result = system.step()  # counts the skipped step (on_bad_step)
        assert result.skipped and result.scaler_backoff
    hook.remove()
    assert system.scaler.get_scale() == 0.25
    assert system.skipped_steps == 12 and system.bad_steps_in_a_row == 2 and system.rollbacks == 0
    system.mixed_precision = True  # so that loading restores the checkpoint's scaler, as on CUDA
    system.rollback()
    assert system.rollbacks == 1 and system.global_step == 0
    assert checkpoint_scale == 1024.0 and system.scaler.get_scale() == 1.0

    fresh = build_system(scene, tmp_path / "fresh")
    fresh.scaler, fresh.mixed_precision = torch.amp.GradScaler("cpu", init_scale=1024.0), True
    fresh.save()
    fresh.global_step = 5
    fresh.rollback()
    assert fresh.global_step == 0 and fresh.scaler.get_scale() == 1024.0


def test_the_sdf_mlp_stays_float32_under_autocast():
    """CPU's bfloat16 autocast stands in for CUDA's float16: the SDF, the feature and the
    x-gradient (forward_with_grad), and the SDF alone (sdf: the occupancy and mesh path) come out
    float32 and exactly as without autocast; the colour MLP does run in it."""
    torch.manual_seed(0)
    config = load_config(CPU_CONFIG, TINY).model
    model = SDFNetwork(config.geometry, radius=1.0)
    colour = ColorNetwork(config.texture, feature_dim=config.geometry.feature_dim)
    x = torch.rand(64, 3) * 1.6 - 0.8  # [64, 3]
    plain = (*model.forward_with_grad(x, create_graph=True), model.sdf(x))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = (*model.forward_with_grad(x, create_graph=True), model.sdf(x))
        feature = colour.point_features(model.unit_box(x), mixed[1])  # [64, F (+ appearance grid)]
        rgb = colour.mlp(torch.cat([feature, torch.zeros(64, colour.dir_encoding.n_output_dims), mixed[2]], dim=-1))
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rgb.dtype == torch.bfloat16


@needs_cuda
def test_fp16_mixed_training_steps_on_cuda(scene, tmp_path):
    """auto precision on CUDA is fp16-mixed: steps train with finite parameters, and the
    checkpoint holds the scaler's state and loads with weights_only and into a fresh system."""
    overrides = [o for o in TINY if not o.startswith("device=")] + ["device=cuda", f"dataset.root_dir={scene}"]
    config = load_config(CPU_CONFIG, overrides)
    import systems

    system = systems.Trainer(config, systems.RunPaths.for_trial(str(tmp_path / "a")),
                                                     torch.device("cuda"))
    assert system.mixed_precision and system.backends["trainer.precision"] == "fp16-mixed"
    trained = 0
    for _ in range(12):
        trained += not system.step().skipped
    assert trained >= 6
    assert all(torch.isfinite(p).all() for p in system.model.parameters())
    state = load_checkpoint(system.save())
    assert state["grad_scaler"]["scale"] == system.scaler.get_scale()
    other = systems.Trainer(config, systems.RunPaths.for_trial(str(tmp_path / "b")),
                                                    torch.device("cuda"))
    other.load(system.checkpoint_path(system.global_step))
    assert other.scaler.get_scale() == system.scaler.get_scale()
