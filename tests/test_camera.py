"""Camera helpers: look-at poses, the orbit fitted to input cameras, pixel rescaling."""
import numpy as np

from utils.camera import (
    aligned_pose_errors, axes_meeting_point, downscale_matrix, look_at, orbit_poses, project, similarity_transform,
)


def test_look_at_axes_follow_opencv():
    """From (0, -3, 0) looking at the origin with z up: forward +y, right +x, down -z, det +1."""
    c2w = look_at(np.array([0.0, -3.0, 0.0]), np.zeros(3), np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(c2w[:, 2], [0, 1, 0], atol=1e-12)  # z forward
    np.testing.assert_allclose(c2w[:, 0], [1, 0, 0], atol=1e-12)  # x right
    np.testing.assert_allclose(c2w[:, 1], [0, 0, -1], atol=1e-12)  # y down
    assert np.linalg.det(c2w[:, :3]) > 0


def ring(n, radius, height, up=np.array([0.0, 0.0, 1.0])):
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([look_at(np.array([radius * np.cos(a), radius * np.sin(a), height]), np.zeros(3), up)
                     for a in angles])


def test_orbit_of_a_horizontal_ring_is_that_ring():
    """Cameras on a ring of radius 2.5 at height 1 -> an orbit of radius 2.5 at height 1,
    every frame looking at the origin with the same up."""
    poses = orbit_poses(ring(12, 2.5, 1.0), 30)
    centres = poses[:, :, 3]
    np.testing.assert_allclose(centres[:, 2], 1.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(centres[:, :2], axis=1), 2.5, atol=1e-9)
    forward = -centres / np.linalg.norm(centres, axis=1, keepdims=True)
    np.testing.assert_allclose(poses[:, :, 2], forward, atol=1e-9)
    assert (poses[:, 2, 1] < 0).all()  # image y (down) points down in the world


def test_orbit_of_a_cap_stays_over_the_cameras():
    """DTU-like cameras on a cap (within 30 degrees of +x, distance 3) -> an orbit around the
    cap's axis: every frame within a small distance of some input camera."""
    rng = np.random.default_rng(0)
    poses = []
    for _ in range(40):
        theta, phi = rng.uniform(0, np.radians(30)), rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(theta), np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)])
        poses.append(look_at(3 * direction, np.zeros(3), np.array([0.0, 0.0, 1.0])))
    poses = np.stack(poses)
    orbit = orbit_poses(poses, 24)
    nearest = np.linalg.norm(orbit[:, None, :, 3] - poses[None, :, :, 3], axis=-1).min(1)
    assert nearest.max() < 0.6  # cameras are ~1.5 apart across the cap: the orbit is among them
    assert (orbit[:, 0, 3] > 2.0).all()  # on the cap's side of the object


def test_downscale_matrix_keeps_pixel_centres():
    """Pixel centre u = 3 (covering [2.5, 3.5)) of a 2x-downscaled image covers original
    [5, 7): centre 6.5 -> (6.5 + 0.5) / 2 - 0.5 = 3."""
    S = downscale_matrix(2.0)
    np.testing.assert_allclose(S @ [6.5, 6.5, 1.0], [3.0, 3.0, 1.0])
    world_mat = np.array([[100.0, 0, 50, 0], [0, 100.0, 40, 0], [0, 0, 1, 5]])
    # [100 * 0.1 + 50 * 1, 100 * -0.2 + 40 * 1, 1 + 5] = [60, 20, 6] -> (10, 3.333), depth 6
    uv, depth = project(np.array([[0.1, -0.2, 1.0]]), world_mat)
    np.testing.assert_allclose(uv, [[10.0, 20.0 / 6.0]])
    np.testing.assert_allclose(depth, [6.0])


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_similarity_transform_recovers_a_known_similarity():
    """target = 2.5 R source + (1, -2, 3) exactly -> s = 2.5, that R and t."""
    rng = np.random.default_rng(1)
    R = random_rotation(rng)
    source = rng.normal(size=(20, 3))
    s, R_est, t = similarity_transform(source, 2.5 * source @ R.T + np.array([1.0, -2.0, 3.0]))
    assert abs(s - 2.5) < 1e-12
    np.testing.assert_allclose(R_est, R, atol=1e-12)
    np.testing.assert_allclose(t, [1.0, -2.0, 3.0], atol=1e-12)


def test_axes_meeting_point_of_cameras_looking_at_a_point():
    target = np.array([1.0, 2.0, 3.0])
    poses = ring(8, 2.0, 0.5)
    poses = np.stack([look_at(p[:, 3] + target, target, np.array([0.0, 0.0, 1.0])) for p in poses])
    np.testing.assert_allclose(axes_meeting_point(poses), target, atol=1e-9)


def test_aligned_pose_errors_ignore_a_similarity_and_see_a_tilt():
    """A ring seen in another frame (scale 0.1, rotated, moved): no error; one camera
    tilted by 2 degrees: 2 degrees there, (about) nothing elsewhere."""
    rng = np.random.default_rng(2)
    truth = ring(10, 3.0, 1.0)
    R = random_rotation(rng)
    other = np.concatenate([np.einsum("ij,njk->nik", R.T, truth[:, :, :3]),
                            (0.1 * (truth[:, :, 3] - [1.0, 2.0, 3.0]) @ R)[:, :, None]], axis=2)
    rotation, centre, (s, _, _) = aligned_pose_errors(other, truth)
    assert abs(s - 10.0) < 1e-9 and rotation.max() < 1e-5 and centre.max() < 1e-9
    angle = np.radians(2.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    other[3, :, :3] = other[3, :, :3] @ tilt
    rotation, centre, _ = aligned_pose_errors(other, truth)
    assert abs(rotation[3] - 2.0) < 1e-6 and np.delete(rotation, 3).max() < 1e-5
