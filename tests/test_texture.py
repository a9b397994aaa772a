"""Textured mesh export: the atlas maths on hand-worked cases, and an export round trip whose
texture must show the colour field it was baked from, at the right places, in the world frame."""
import numpy as np
import pytest
import torch
import trimesh

from systems.texture import export_textured
from utils.texture import dilate, grid_atlas, rasterize_atlas, texel_points


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

    def surface_colors(self, x, chunk):
        return self.colour(x)


def test_export_round_trip_in_the_world_frame(tmp_path):
    """OBJ + MTL + PNG and GLB load back with the same faces and a texture, in the world
    frame (scale_mat applied), and the texture looked up at each face's centre gives the
    colour field there (within the 8-bit and bilinear error)."""
    mesh = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces, radius 1 (normalised frame)
    scale_mat = np.diag([80.0, 80.0, 80.0, 1.0])
    scale_mat[:3, 3] = (12.0, -7.0, 30.0)

    class Config:
        texture_faces, texture_size, mesh_chunk = 2000, 512, 65536

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
