"""Textured mesh export: the atlas maths on hand-worked cases, and an export round trip whose
texture must show the colour field it was baked from, at the right places, in the world frame."""
import os

import numpy as np
import pytest
import torch
import trimesh

from systems.texture import Cameras, ViewSelector, colour_points, export_textured
from utils.texture import (
    depth_map,
    depth_test,
    dilate,
    facing,
    grid_atlas,
    project,
    rasterize_atlas,
    sample_image,
    texel_points,
    top_views,
    view_weights,
)


def test_one_triangle_by_hand():
    """The lower-left half of a 4x4 atlas: texel centres on or below the diagonal u + v = 1
    (v up, row 0 on top) are covered; texel (row 3, col 0) has its centre at
    (u, v) = (0.125, 0.125), barycentrics (0.75, 0.125, 0.125)."""
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    face_id, bary = rasterize_atlas(uv, np.array([[0, 1, 2]]), 4, margin=0.0)
    expected = np.array([[0, -1, -1, -1], [0, 0, -1, -1], [0, 0, 0, -1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(face_id, expected)
    np.testing.assert_allclose(bary[3, 0], [0.75, 0.125, 0.125], atol=1e-6)
    # conservative: texels the triangle touches (within half a diagonal) count too,
    # with barycentrics clamped onto the triangle
    face_id, bary = rasterize_atlas(uv, np.array([[0, 1, 2]]), 4)
    assert face_id[0, 1] == 0 and face_id[0, 3] == -1
    assert (bary[face_id >= 0] >= 0).all()
    np.testing.assert_allclose(bary[face_id >= 0].sum(-1), 1.0, atol=1e-6)


def test_two_triangles_split_a_square_without_overlap():
    """A square cut along its diagonal: every texel belongs to the triangle holding its centre
    (the deeper one wins where both reach it)."""
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    face_id, _ = rasterize_atlas(uv, faces, 8)
    rows, cols = np.mgrid[0:8, 0:8]
    u, v = (cols + 0.5) / 8, 1 - (rows + 0.5) / 8
    assert (face_id[u > v + 1e-9] == 0).all() and (face_id[v > u + 1e-9] == 1).all()
    assert (face_id >= 0).all()


def test_grid_atlas_gives_every_triangle_its_own_texels():
    mesh = trimesh.creation.icosphere(subdivisions=2)  # 320 faces
    corner_vertex, uv, uv_faces = grid_atlas(mesh.vertices, mesh.faces, 128)
    assert uv.min() >= 0 and uv.max() <= 1 and uv_faces.shape == mesh.faces.shape
    # the corners are the faces' own vertices, rotated (winding kept)
    rolled = corner_vertex[uv_faces]
    assert all(tuple(r) in {tuple(np.roll(f, -k)) for k in range(3)} for r, f in zip(rolled, mesh.faces))
    face_id, _ = rasterize_atlas(uv, uv_faces, 128, margin=0.0)
    counts = np.bincount(face_id[face_id >= 0], minlength=len(mesh.faces))
    assert counts.min() >= 4  # 128^2 / 160 cells: ~100 texels a cell, two triangles in each
    # with the conservative margin the triangles still never reach their neighbours' texels
    face_id_grown, _ = rasterize_atlas(uv, uv_faces, 128)
    same = face_id >= 0
    np.testing.assert_array_equal(face_id_grown[same], face_id[same])


def test_dilate_takes_the_nearest_filled_colour():
    image = np.zeros((5, 5, 3), np.float32)
    filled = np.zeros((5, 5), bool)
    image[1, 1], filled[1, 1] = (1, 0, 0), True
    image[3, 4], filled[3, 4] = (0, 0, 1), True
    out = dilate(image, filled)
    np.testing.assert_array_equal(out[0, 0], (1, 0, 0))
    np.testing.assert_array_equal(out[4, 4], (0, 0, 1))
    np.testing.assert_array_equal(out[1, 1], (1, 0, 0))


class ColourField(torch.nn.Module):
    """Stands in for NeuSModel: the colour of a surface point is a smooth function of it."""

    @staticmethod
    def colour(x):
        return 0.5 + 0.45 * torch.sin(3.0 * x)

    def surface_colors(self, x, chunk, dirs=None):
        """Head-on: the field at x; along dirs [N, K, 3]: 0.5 + 0.5 * dir (the point ignored)."""
        if dirs is None:
            return self.colour(x)
        return 0.5 + 0.5 * dirs


def test_export_round_trip_in_the_world_frame(tmp_path):
    """OBJ + MTL + PNG and GLB load back with the same faces and a texture, in the world
    frame (scale_mat applied), and the texture looked up at each face's centre gives the
    colour field there (within the 8-bit and bilinear error)."""
    mesh = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces, radius 1 (normalised frame)
    scale_mat = np.diag([80.0, 80.0, 80.0, 1.0])
    scale_mat[:3, 3] = (12.0, -7.0, 30.0)

    class Config:
        texture_faces, texture_size, mesh_chunk = 2000, 512, 65536
        texture_colour, texture_views = "head_on", 3

    paths = export_textured(ColourField(), mesh.vertices, mesh.faces, scale_mat, Config, str(tmp_path / "it000006-mc32"),
                            torch.device("cpu"))
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == [f"it000006-mc32-textured.{ext}" for ext in ("glb", "mtl", "obj", "png")]
    obj = trimesh.load(tmp_path / "it000006-mc32-textured.obj", process=False, force="mesh")
    glb = trimesh.load(tmp_path / "it000006-mc32-textured.glb", force="mesh")
    assert 1900 <= len(obj.faces) <= 2000 and len(glb.faces) == len(obj.faces)
    for loaded in (obj, glb):
        material = loaded.visual.material
        image = getattr(material, "image", None) or material.baseColorTexture
        assert image.size == (512, 512)
        radius = np.linalg.norm(loaded.vertices - (12.0, -7.0, 30.0), axis=1)
        assert 75.0 < radius.min() and radius.max() < 80.5  # the sphere of radius 80 around the centre
    image = np.asarray(obj.visual.material.image.convert("RGB"), np.float32) / 255
    centre_uv = obj.visual.uv[obj.faces].mean(axis=1)
    h, w = image.shape[:2]
    texel = image[((1 - centre_uv[:, 1]) * h).astype(int), (centre_uv[:, 0] * w).astype(int)]
    centre_normalised = (obj.triangles_center - (12.0, -7.0, 30.0)) / 80.0
    expected = ColourField.colour(torch.from_numpy(centre_normalised)).numpy()
    assert np.abs(texel - expected).max() < 0.05


# --- colour from the training views --------------------------------------------------------

K_TEST = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])


def test_project_by_hand():
    """u = fx x/z + cx, v = fy y/z + cy in the camera frame x_cam = R^T (p - o)."""
    point = np.array([[0.1, -0.2, 2.0]])
    identity = np.hstack([np.eye(3), np.zeros((3, 1))])
    turned = np.hstack([np.diag([-1.0, 1.0, -1.0]), [[0.0], [0.0], [4.0]]])  # at z = 4, looking down -z
    uv, z = project(point, np.stack([K_TEST, K_TEST]), np.stack([identity, turned]))
    # camera 1: (0.1, -0.2, 2) -> u = 100 * 0.05 + 50, v = 100 * -0.1 + 40
    # camera 2: R^T (p - o) = diag(-1, 1, -1) (0.1, -0.2, -2) = (-0.1, -0.2, 2)
    np.testing.assert_allclose(uv[:, 0], [[55.0, 30.0], [45.0, 30.0]])
    np.testing.assert_allclose(z[:, 0], [2.0, 2.0])


def camera_point(u, v, z):
    """The camera-frame point (identity camera, K_TEST) at pixel (u, v), depth z."""
    return [(u - 50.0) / 100.0 * z, (v - 40.0) / 100.0 * z, z]


def two_triangle_scene():
    """A tilted triangle projecting to (10, 0), (90, 0), (10, 80) at depths 1, 3, 1, and a small
    one in front of it at depth 0.5 projecting to (20, 5), (40, 5), (20, 25)."""
    vertices = np.array([camera_point(10, 0, 1), camera_point(90, 0, 3), camera_point(10, 80, 1),
                         camera_point(20, 5, 0.5), camera_point(40, 5, 0.5), camera_point(20, 25, 0.5)])
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    identity = np.hstack([np.eye(3), np.zeros((3, 1))])[None]
    uv, z = project(vertices, K_TEST[None], identity)
    return depth_map(uv[0], z[0], faces, 100, 81)


def test_depth_map_is_perspective_correct_and_keeps_the_nearest():
    depth = two_triangle_scene()
    # (50, 20): screen barycentrics (0.25, 0.5, 0.25) -> 1/z = 0.25/1 + 0.5/3 + 0.25/1 = 2/3, z = 1.5
    # (an affine depth would give 2.0)
    assert depth[20, 50] == pytest.approx(1.5, rel=1e-5)
    assert depth[10, 25] == pytest.approx(0.5, rel=1e-5)  # the front triangle hides the tilted one
    assert np.isinf(depth[70, 80])  # outside both (s + t = 0.875 + 0.875 > 1)
    assert np.isinf(depth[0, 95])


def test_depth_test_on_the_two_triangles():
    depth = two_triangle_scene()
    # on the tilted triangle at (25, 10): b = (0.6875, 0.1875, 0.125), 1/z = 0.6875 + 0.0625 + 0.125
    hidden_z = 1.0 / 0.875
    uv = np.array([[50.0, 20.0], [25.0, 10.0], [25.2, 9.8], [150.0, 20.0], [50.0, 20.0]])
    z = np.array([1.5, hidden_z, 0.5, 1.0, -1.5])
    seen = depth_test(uv[None], z[None], depth[None], 0.01)[0]
    # seen; behind the front triangle; on the front triangle (nearest pixel centre); outside the
    # image; behind the camera
    np.testing.assert_array_equal(seen, [True, False, True, False, False])


def test_view_weights_and_top_views_by_hand():
    normals = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # three cameras: straight above the first point, at 45 degrees from both, below the tangent plane
    centres = np.array([[0.0, 0.0, 2.0], [3.0, 0.0, 2.0], [4.0, 0.0, -0.5]])
    cos = facing(normals, points, centres)
    # (0, 0, 2): 1 and 2 / sqrt(5); (3, 0, 2): 2 / sqrt(13) and 1 / sqrt 2; (4, 0, -0.5): negative
    np.testing.assert_allclose(cos[:2], [[1.0, 2 / np.sqrt(5)], [2 / np.sqrt(13), np.sqrt(0.5)]])
    assert (cos[2] < 0).all()
    cos[1, 0] = np.sqrt(0.5)  # make both points see camera 2 at 45 degrees
    visible = np.array([[True, False], [True, True], [True, True]])
    w = view_weights(cos, visible, 4.0, 0.1)
    # cos^4: 1, (1/sqrt 2)^4 = 0.25, 0 (cos < 0.1); point 2 does not see camera 1
    np.testing.assert_allclose(w, [[1.0, 0.0], [0.25, 0.25], [0.0, 0.0]])
    index, weight = top_views(w, 2)
    order = np.argsort(-weight, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(index, order, 1)[0], [0, 1])
    np.testing.assert_allclose(np.sort(weight, axis=1)[:, ::-1], [[0.8, 0.2], [1.0, 0.0]])
    _, none = top_views(np.zeros((3, 1)), 2)  # a point no camera sees: all weights 0
    np.testing.assert_array_equal(none, [[0.0, 0.0]])


def test_sample_image_bilinear_at_integer_pixel_centres():
    images = np.zeros((2, 2, 3, 1), np.uint8)
    images[1, :, :, 0] = [[0, 10, 20], [30, 40, 50]]
    out = sample_image(images, np.array([1, 1, 1, 0]), np.array([[1.0, 0.0], [0.5, 0.5], [9.0, 9.0], [1.0, 1.0]]))
    # (u=1, v=0) -> 10; halfway between 0, 10, 30, 40 -> 20; clamped to the last pixel -> 50; image 0 -> 0
    np.testing.assert_allclose(out[:, 0], [10.0, 20.0, 50.0, 0.0])


def look_at(centre, target, up=(0.0, 1.0, 0.0)):
    """c2w [3, 4] of a camera at centre looking at target (OpenCV axes, y down; world `up`)."""
    z = np.asarray(target, float) - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    return np.hstack([np.stack([x, np.cross(z, x), z], axis=1), np.asarray(centre, float)[:, None]])


def two_view_scene():
    """The square [-1, 1]^2 at z = 0 (two triangles, normal +z), a small triangle floating at
    z = 1 around (1.25, 0, 1), between (0.5, 0, 0) and camera 2. Camera 1 at (0, 0, 2) looks
    down; camera 2 at (2, 0, 2) looks at the origin. Photo 1 is all red, photo 2 all blue."""
    vertices = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0],
                         [1.15, -0.1, 1], [1.35, -0.1, 1], [1.25, 0.1, 1]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    intrinsics = np.array([[[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]]] * 2)
    c2w = np.stack([look_at([0.0, 0, 2], [0, 0, 0]), look_at([2.0, 0, 2], [0, 0, 0])])
    images = np.zeros((2, 101, 101, 3), np.uint8)
    images[0, ..., 0] = 255
    images[1, ..., 2] = 255
    return Cameras(intrinsics, c2w, images), vertices, faces


def test_photos_blend_the_views_that_see_a_point():
    """At the origin both cameras see the point: weights cos = 1 and 1/sqrt 2, normalised
    1/(1 + 1/sqrt 2) = 0.58579 red + 0.41421 blue. At (0.5, 0, 0) the floating triangle hides
    camera 2: red. k = 0 (every view) blends the same two."""
    cameras, vertices, faces = two_view_scene()
    selector = ViewSelector(cameras, vertices, faces)
    points = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    normals = np.array([[0.0, 0.0, 1.0]] * 2)
    view, weight, _ = selector.select(points, normals, 2)
    np.testing.assert_allclose(weight[0][np.argsort(view[0])], [0.58579, 0.41421], atol=1e-5)
    np.testing.assert_allclose(np.sort(weight[1]), [0.0, 1.0], atol=1e-6)
    for k in (2, 0):
        colours = colour_points(ColourField(), points, normals, "photos", selector, k, 1024, torch.device("cpu"))
        np.testing.assert_allclose(colours, [[0.58579, 0.0, 0.41421], [1.0, 0.0, 0.0]], atol=1e-5)
    # a point below the square faces away from both: the network, head-on
    below = colour_points(ColourField(), np.array([[0.0, 0.0, 0.0]]), np.array([[0.0, 0.0, -1.0]]), "photos",
                          selector, 2, 1024, torch.device("cpu"))
    np.testing.assert_allclose(below, ColourField.colour(torch.zeros(1, 3)).numpy(), atol=1e-6)


def test_a_view_whose_mask_shows_background_there_does_not_see_the_point():
    """Camera 2's mask is background around its principal point (50, 50), where the origin
    projects: the origin is seen by camera 1 alone (red). A point camera 2 sees on its mask,
    (-0.5, 0, 0), still blends both."""
    cameras, vertices, faces = two_view_scene()
    cameras.masks = np.ones((2, 101, 101), np.float32)
    cameras.masks[1, 45:56, 45:56] = 0.0
    selector = ViewSelector(cameras, vertices, faces)
    points, normals = np.array([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0]] * 2)
    _, weight, _ = selector.select(points, normals, 0)
    np.testing.assert_allclose(np.sort(weight[0]), [0.0, 1.0], atol=1e-6)
    assert (weight[1] > 0.1).all()
    colours = colour_points(ColourField(), points[:1], normals[:1], "photos", selector, 0, 1024, torch.device("cpu"))
    np.testing.assert_allclose(colours, [[1.0, 0.0, 0.0]], atol=1e-5)


def test_network_views_evaluate_the_network_along_the_seeing_views():
    """The stand-in network answers 0.5 + 0.5 d for view direction d (camera -> point): at the
    origin d1 = (0, 0, -1), d2 = (-1, 0, -1)/sqrt 2, blended 0.58579 / 0.41421:
    0.58579 (0.5, 0.5, 0) + 0.41421 (0.14645, 0.5, 0.14645) = (0.35355, 0.5, 0.06066)."""
    cameras, vertices, faces = two_view_scene()
    selector = ViewSelector(cameras, vertices, faces)
    colours = colour_points(ColourField(), np.zeros((1, 3)), np.array([[0.0, 0.0, 1.0]]), "network_views", selector,
                            3, 1024, torch.device("cpu"))
    np.testing.assert_allclose(colours, [[0.35355, 0.5, 0.06066]], atol=1e-4)


def test_texture_colour_is_a_validated_choice():
    from systems.config import load_config
    from utils.config import ConfigError

    config = load_config("confs/neus-dtu-wmask-cpu.yaml", ["export.texture_colour=network_views"])
    assert config.export.texture_colour == "network_views"
    with pytest.raises(ConfigError, match="texture_colour"):
        load_config("confs/neus-dtu-wmask-cpu.yaml", ["export.texture_colour=photo"])


def test_bake_with_photos_takes_every_texel_from_the_photos():
    """Every point of the two-view scene faces a camera that sees it, so every texel is a blend
    of the red and the blue photo (r + b = 1, no green), never the network's head-on colour
    (whose green is 0.5 + 0.45 sin(3 y) > 0)."""
    from systems.texture import bake_texture

    cameras, vertices, faces = two_view_scene()
    corner_vertex, uv, uv_faces, image = bake_texture(ColourField(), vertices, faces, 64, 1024, torch.device("cpu"),
                                                      "photos", cameras, 2)
    face_id, _ = rasterize_atlas(uv, uv_faces, 64)
    texels = image[face_id >= 0].astype(int)
    assert (texels[:, 1] == 0).all()
    assert (np.abs(texels[:, 0] + texels[:, 2] - 255) <= 1).all()


# --- the photos at export.texture_photo_scale, the z-buffers at the training size -------------

def test_photo_downscale_rule():
    """dataset.img_downscale of the texture's photos: training's / texture_photo_scale, never
    below 1 (the files)."""
    from systems.texture import photo_downscale

    assert photo_downscale(4.0, 2.0) == 2.0  # scan 24 trained at 400x300: photos 800x600
    assert photo_downscale(4.0, 1.0) == 4.0  # scale 1: the training images
    assert photo_downscale(4.0, 8.0) == 1.0  # never finer than the files
    assert photo_downscale(1.0, 2.0) == 1.0  # the demo, trained at its files' size
    assert photo_downscale(8.0, 2.5) == 3.2
    with pytest.raises(ValueError, match="texture_photo_scale"):
        photo_downscale(4.0, 0.0)


def test_no_reload_when_the_photos_would_be_the_training_images(caplog):
    """img_downscale 1 (the demo) with scale 2, or scale 1 at any downscale: dataset.views
    itself, no loader called (the name is not even a registered dataset)."""
    from types import SimpleNamespace

    from systems.texture import texture_photos

    views = SimpleNamespace(images=np.zeros((3, 30, 40, 3), np.uint8))
    for downscale, scale in ((1.0, 2.0), (1.0, 8.0), (4.0, 1.0)):
        dataset = SimpleNamespace(views=views, split={"train": [1, 2]},
                                  config=SimpleNamespace(name="no-such-loader", img_downscale=downscale))
        with caplog.at_level("INFO"):
            assert texture_photos(dataset, scale) is views
        assert "texture photos: the training images as loaded, 40x30" in caplog.text


def write_neus_scene(root, width=32, height=24, n_views=4):
    """A NeuS-format scene of random photos and masks at width x height, K = [[40, 0, 15.5],
    [0, 40, 11.5], [0, 0, 1]], cameras at distance 3 around the origin, scale_mat = I ->
    the photos [n, h, w, 3] RGB, K, c2w [n, 3, 4]."""
    import cv2

    rng = np.random.default_rng(0)
    os.makedirs(root / "image"), os.makedirs(root / "mask")
    K = np.array([[40.0, 0.0, 15.5], [0.0, 40.0, 11.5], [0.0, 0.0, 1.0]])
    cameras, photos, c2ws = {}, [], []
    for i in range(n_views):
        angle = 2 * np.pi * i / n_views
        c2w = look_at([3 * np.cos(angle), 3 * np.sin(angle), 1.0], [0.0, 0.0, 0.0], up=(0.0, 0.0, 1.0))
        R = c2w[:, :3].T
        world_mat = np.eye(4)
        world_mat[:3] = K @ np.hstack([R, -(R @ c2w[:, 3])[:, None]])
        cameras[f"world_mat_{i}"], cameras[f"scale_mat_{i}"] = world_mat, np.eye(4)
        photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        mask[4:20, 8:24] = 255
        cv2.imwrite(str(root / "image" / f"{i:06d}.png"), photo[:, :, ::-1])
        cv2.imwrite(str(root / "mask" / f"{i:06d}.png"), mask)
        photos.append(photo)
        c2ws.append(c2w)
    np.savez(root / "cameras_sphere.npz", **cameras)
    return np.stack(photos), K, np.stack(c2ws)


def test_photos_re_read_at_the_files_size_through_the_loader(tmp_path, caplog):
    """A 32x24 scene trained at img_downscale 2 (16x12): texture_photo_scale 2 re-reads the
    files themselves (32x24, the file's K, the same poses, masks at 32x24), the z-buffers
    sized from the training images (16x12); scale 4 asks finer than the files: the same 32x24;
    scale 1: the training images as loaded."""
    from process_data.dtu import DTUDataset
    from systems.texture import Cameras

    photos, K, c2w = write_neus_scene(tmp_path / "scene")
    config = DTUDataset.parse_config({"name": "dtu", "root_dir": str(tmp_path / "scene"), "img_downscale": 2,
                                      "holdout_every": 4}, "dataset")
    dataset = DTUDataset(config, "cpu")
    assert dataset.split["train"] == [1, 2, 3] and (dataset.width, dataset.height) == (16, 12)
    for scale in (2.0, 4.0):
        with caplog.at_level("INFO"):
            cameras = Cameras.training(dataset, scale)
        assert "texture photos: 32x24, the files re-read at dataset.img_downscale 1" in caplog.text
        np.testing.assert_array_equal(cameras.images, photos[1:])
        np.testing.assert_allclose(cameras.intrinsics, np.stack([K] * 3), atol=1e-6)
        np.testing.assert_allclose(cameras.c2w, c2w[1:], atol=1e-6)
        assert cameras.masks.shape == (3, 24, 32) and cameras.masks[0, 4, 8] == 1 and cameras.masks[0, 3, 8] == 0
        assert cameras.depth_size == (16, 12)
    assert config.img_downscale == 2  # the run's config is left as it was
    training = Cameras.training(dataset, 1.0)
    assert training.images.shape == (3, 12, 16, 3) and training.depth_size == (16, 12)
    # K of the 16x12 images: u' = (u + 0.5) / 2 - 0.5: f 20, centre (7.5, 5.5)
    np.testing.assert_allclose(training.intrinsics[0], [[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]], atol=1e-6)


def two_view_scene_at(factor):
    """two_view_scene with 50x50 z-buffer-sized cameras (f 50, centre 24.5) whose photos are
    `factor` times finer: f 50 factor, centre (24.5 + 0.5) factor - 0.5; photo 1 red, photo 2
    blue; camera 2's mask background over z-buffer pixels [20, 30)^2."""
    _, vertices, faces = two_view_scene()
    f, c = 50.0 * factor, 25.0 * factor - 0.5
    intrinsics = np.array([[[f, 0, c], [0, f, c], [0, 0, 1]]] * 2)
    c2w = np.stack([look_at([0.0, 0, 2], [0, 0, 0]), look_at([2.0, 0, 2], [0, 0, 0])])
    n = 50 * factor
    images = np.zeros((2, n, n, 3), np.uint8)
    images[0, ..., 0], images[1, ..., 2] = 255, 255
    masks = np.ones((2, 50, 50), np.float32)
    masks[1, 20:30, 20:30] = 0.0
    masks = masks.repeat(factor, axis=1).repeat(factor, axis=2)
    return Cameras(intrinsics, c2w, images, masks, (50, 50)), vertices, faces


def test_photos_at_twice_the_z_buffer_size_see_what_the_training_size_sees():
    """Photos 100x100 with z-buffers sized from 50x50 training images: the z-buffer camera is
    the 50x50 one (f 50, centre 24.5), the z-buffers and the mask are those of photos at
    50x50, every point is seen by the same views with the same weights, and its photo pixel is
    2 u + 0.5."""
    one, vertices, faces = two_view_scene_at(1)
    two, _, _ = two_view_scene_at(2)
    selector_one, selector_two = ViewSelector(one, vertices, faces), ViewSelector(two, vertices, faces)
    assert selector_two.size == (50, 50)
    np.testing.assert_allclose(selector_two.scale, [0.5, 0.5])
    np.testing.assert_allclose(selector_two.depth_intrinsics[1], [[50.0, 0, 24.5], [0, 50.0, 24.5], [0, 0, 1]])
    np.testing.assert_allclose(selector_two.depth, selector_one.depth, rtol=1e-6)
    assert np.isneginf(selector_two.depth[1, 20:30, 20:30]).all() and np.isneginf(selector_two.depth).sum() == 100
    grid = np.linspace(-0.95, 0.95, 39)
    points = np.stack(np.meshgrid(grid, grid, [0.0], indexing="ij"), axis=-1).reshape(-1, 3)
    normals = np.tile([0.0, 0.0, 1.0], (len(points), 1))
    view_one, weight_one, uv_one = selector_one.select(points, normals, 0)
    view_two, weight_two, uv_two = selector_two.select(points, normals, 0)
    np.testing.assert_array_equal(view_two, view_one)
    np.testing.assert_allclose(weight_two, weight_one, atol=1e-6)
    assert 0 < (weight_one[:, 1] == 0).sum() < len(points)  # camera 2 misses some (occluder, mask, border)
    np.testing.assert_allclose(uv_two, 2 * uv_one + 0.5, atol=1e-3)


def test_background_at_depth_pixels_is_the_mask_averaged_over_the_footprint():
    """A z-buffer pixel covers 2x2 photo pixels: background when fewer than half of them show
    the object (1 of 4: background; 2 of 4: the object)."""
    cameras, vertices, faces = two_view_scene_at(1)
    selector = ViewSelector(cameras, vertices, faces)
    masks = np.ones((1, 100, 100), np.float32)
    masks[0, 0:2, 0:2] = [[0, 0], [0, 1]]  # 1 of 4 object
    masks[0, 0:2, 2:4] = [[0, 1], [0, 1]]  # 2 of 4
    masks[0, 2:4, 0:2] = [[0, 0], [0, 0]]
    background = selector.background_at_depth_pixels(masks)
    assert background.shape == (1, 50, 50)
    np.testing.assert_array_equal(background[0, :2, :2], [[True, False], [True, False]])
    assert background.sum() == 2


def load_eval_texture():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("eval_texture", os.path.join(ROOT, "scripts", "eval_texture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supersampling_rays_by_hand():
    """N = 2: sub-pixel centres at -0.25 and +0.25 pixels on each axis, row-major. Through a 2x2
    camera (f 2, centre (0.5, 0.5), identity pose) the offset 0 gives view_rays' rays, and
    pixel (0, 0) moved by (-0.25, -0.25) looks along (-0.375, -0.375, 1) / |.|: u - cx =
    -0.75, over f = 2."""
    from process_data.base import RayDataset, Views

    script = load_eval_texture()
    np.testing.assert_allclose(script.subpixel_offsets(2), [[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25]])
    np.testing.assert_allclose(script.subpixel_offsets(1), [[0.0, 0.0]])
    views = Views(images=np.zeros((1, 2, 2, 3), np.uint8), masks=None,
                  intrinsics=np.array([[[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]]]),
                  c2w=np.hstack([np.eye(3), np.zeros((3, 1))])[None], scale_mat=np.eye(4),
                  world_mats=np.eye(4)[None], names=["0"])
    dataset = RayDataset(views, 0, False, "white", "cpu")
    rays_o, rays_d = script.view_rays_at(dataset, 0, (0.0, 0.0))
    np.testing.assert_allclose(rays_d, dataset.view_rays(0)["rays_d"].numpy(), atol=1e-7)
    np.testing.assert_allclose(rays_o, 0.0)
    _, rays_d = script.view_rays_at(dataset, 0, (-0.25, -0.25))
    np.testing.assert_allclose(rays_d[0], np.array([-0.375, -0.375, 1.0]) / np.sqrt(1 + 2 * 0.375 ** 2), atol=1e-6)
    # the box average of a render that is the ray's x direction: the mean over the 4 sub-pixels
    mean = script.supersampled(lambda rays: rays[1][:, :1], dataset, 0, 2)
    expected = np.mean([script.view_rays_at(dataset, 0, o)[1][:, :1] for o in script.subpixel_offsets(2)], axis=0)
    np.testing.assert_allclose(mean, expected, atol=1e-7)
