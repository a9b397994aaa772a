"""Mesh extraction and clean-up (utils/mesh.py) on analytic shapes with known answers."""
import numpy as np
import torch
import trimesh

from utils.camera import look_at
from utils.mesh import (
    extract_surface,
    local_grid,
    faces_inside_masks,
    largest_component,
    rasterize_silhouette,
    remove_unused_vertices,
    save_mesh,
    silhouette_iou,
    to_world,
)

# normalised -> world: scale 80, centre (12, -7, 30), as the demo scene
SCALE_MAT = np.array([[80.0, 0, 0, 12.0], [0, 80.0, 0, -7.0], [0, 0, 80.0, 30.0], [0, 0, 0, 1]])


def sphere_sdf(centre, radius):
    c = torch.tensor(centre, dtype=torch.float32)
    return lambda x: (x - c).norm(dim=-1) - radius


def test_marching_cubes_sphere_radius_and_outward_normals_in_world_frame():
    """|x - c| - 0.5 at 96^3 over [-1, 1]^3: vertices at radius 0.5 (within half a voxel), and in
    the world frame after scale_mat a sphere of radius 40 around (12, -7, 30) whose face
    normals point away from the centre."""
    vertices, faces = extract_surface(local_grid(sphere_sdf([0.1, 0.0, -0.1], 0.5), 50000, "cpu"), 1.0, 96, 0.0, 48)
    radii = np.linalg.norm(vertices - [0.1, 0.0, -0.1], axis=1)
    voxel = 1.2 / 95  # the fine pass spans the coarse bounding box (~1.1 wide + margin) with 96 points
    assert np.abs(radii - 0.5).max() < voxel
    world = to_world(vertices, SCALE_MAT)
    centre_world = SCALE_MAT[:3, :3] @ [0.1, 0.0, -0.1] + SCALE_MAT[:3, 3]  # (20, -7, 22)
    np.testing.assert_allclose(np.linalg.norm(world - centre_world, axis=1).mean(), 40.0, rtol=0.01)
    mesh = trimesh.Trimesh(world, faces, process=False)
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - centre_world)
    assert (outward > 0).mean() > 0.999
    assert mesh.volume > 0.95 * 4 / 3 * np.pi * 40.0**3


def test_threshold_selects_the_level_set():
    """The iso-level 0.1 of |x| - 0.3 is the sphere of radius 0.4."""
    vertices, _ = extract_surface(local_grid(sphere_sdf([0.0, 0.0, 0.0], 0.3), 50000, "cpu"), 1.0, 64, 0.1, 32)
    np.testing.assert_allclose(np.linalg.norm(vertices, axis=1).mean(), 0.4, atol=0.01)


def test_empty_field_gives_empty_mesh():
    vertices, faces = extract_surface(local_grid(lambda x: torch.ones(x.shape[0]), 10000, "cpu"), 1.0, 32, 0.0, 16)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


def two_spheres():
    """A big sphere (radius 0.4 at the origin) and a small blob (0.1 at (0.7, 0, 0))."""
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    blob = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    blob.apply_translation([0.7, 0.0, 0.0])
    both = trimesh.util.concatenate([big, blob])
    return np.asarray(both.vertices), np.asarray(both.faces), len(big.faces)


def test_largest_component_drops_the_small_blob():
    vertices, faces, n_big = two_spheres()
    kept = largest_component(faces)
    assert len(kept) == n_big
    v, f = remove_unused_vertices(vertices, kept)
    assert np.linalg.norm(v, axis=1).max() < 0.41  # only the big sphere's vertices remain
    assert f.max() == len(v) - 1


def ring_of_cameras(n_views=6, size=(80, 60)):
    """world_mats K [R | t] of cameras on a circle of radius 3 looking at the origin."""
    w, h = size
    K = np.array([[60.0, 0, (w - 1) / 2], [0, 60.0, (h - 1) / 2], [0, 0, 1]])
    mats = []
    for angle in np.linspace(0, 2 * np.pi, n_views, endpoint=False):
        c2w = look_at(np.array([3 * np.cos(angle), 3 * np.sin(angle), 0.5]), np.zeros(3), np.array([0, 0, 1.0]))
        w2c = np.linalg.inv(np.vstack([c2w, [0, 0, 0, 1]]))
        mats.append(np.vstack([K @ w2c[:3], [0, 0, 0, 1]]))
    return mats


def test_mask_culling_removes_an_outlier_blob():
    """Masks drawn from the big sphere alone: every face of the blob projects outside them in
    some view and is culled; the big sphere survives whole."""
    vertices, faces, n_big = two_spheres()
    mats = ring_of_cameras()
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    masks = np.stack(
        [rasterize_silhouette(np.asarray(big.vertices), np.asarray(big.faces), m, (80, 60)) for m in mats]
    ).astype(np.float32)
    kept = faces_inside_masks(vertices, faces, mats, masks, dilation=2)
    assert len(kept) == n_big
    assert (kept < len(big.vertices)).all()


def test_silhouette_of_a_sphere_matches_its_analytic_disc():
    """A sphere of radius 0.4 seen from distance 3.04 covers the disc of angular radius
    asin(0.4 / 3.04); its silhouette IoU against that disc is ~1 and against an empty mask 0."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    mat = ring_of_cameras(1, (120, 90))[0]
    sil = rasterize_silhouette(np.asarray(sphere.vertices), np.asarray(sphere.faces), mat, (120, 90))
    v, u = np.mgrid[0:90, 0:120]
    distance = np.sqrt(3.0**2 + 0.5**2)
    radius_px = 60.0 * np.tan(np.arcsin(0.4 / distance))
    disc = ((u - 59.5) ** 2 + (v - 44.5) ** 2) <= radius_px**2
    iou = (sil & disc).sum() / (sil | disc).sum()
    assert iou > 0.97
    assert silhouette_iou(np.asarray(sphere.vertices), np.asarray(sphere.faces), [mat], np.zeros((1, 90, 120)))[0] == 0


def test_save_mesh_writes_coloured_ply_and_obj(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    colors = np.tile([[1.0, 0.5, 0.0]], (len(sphere.vertices), 1))
    paths = save_mesh(str(tmp_path / "it000010-mc64"), sphere.vertices, sphere.faces, colors, ["ply", "obj"])
    assert [p.rsplit(".", 1)[1] for p in paths] == ["ply", "obj"]
    loaded = trimesh.load(paths[0], process=False)
    assert len(loaded.faces) == len(sphere.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[0], [255, 128, 0, 255])
