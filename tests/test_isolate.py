"""utils/isolate.py: the plane an object stands on, found in the surface, and the cut there."""
import mcubes
import numpy as np

from utils.camera import look_at
from utils.isolate import face_centres_and_areas, find_support_plane, split_at_plane, support_plane_from_points

N = 72
AXIS = np.linspace(-1.05, 1.05, N)
VOXEL = AXIS[1] - AXIS[0]
CENTRE = np.array([0.1, 0.0, -0.2])  # the object: a ball of radius 0.3 ...
TABLE_Z = -0.45  # ... sinking 0.05 into a table top at z = -0.45


def surface(with_table: bool):
    """Marching cubes of min(ball, half-space below the table top) cut by the unit sphere, as
    an unmasked run's SDF would hold the object and the table inside the region."""
    x, y, z = np.meshgrid(AXIS, AXIS, AXIS, indexing="ij")
    sdf = np.sqrt((x - CENTRE[0]) ** 2 + (y - CENTRE[1]) ** 2 + (z - CENTRE[2]) ** 2) - 0.3
    if with_table:
        sdf = np.minimum(sdf, z - TABLE_Z)
    sdf = np.maximum(sdf, np.sqrt(x**2 + y**2 + z**2) - 1.0)
    vertices, faces = mcubes.marching_cubes(-sdf, 0.0)  # mcubes: inside is above the level
    return vertices * VOXEL - 1.05, faces.astype(np.int64)


def ring(height: float, n: int = 12, radius: float = 2.5, target=(0.0, 0.0, -0.2)) -> np.ndarray:
    """Upright cameras (world up +z) on a circle at `height`, looking at `target` -> c2w [n, 3, 4]"""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    centres = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.full(n, height)], axis=1)
    return np.stack([look_at(c, np.asarray(target), np.array([0.0, 0.0, 1.0])) for c in centres])


def test_finds_the_table_and_keeps_the_ball():
    """Cameras above: the plane is z = -0.45 with its normal up (n = (0, 0, 1), d = 0.45);
    cutting 0.02 above it keeps only the ball (every kept vertex 0.3 from its centre, all
    of it above z = -0.43) and removes the table disc, which holds most of the area."""
    vertices, faces = surface(with_table=True)
    plane = find_support_plane(vertices, faces, ring(0.8), radius=1.0)
    assert plane is not None
    np.testing.assert_allclose(plane.normal, [0, 0, 1], atol=0.01)
    np.testing.assert_allclose(plane.offset, -TABLE_Z, atol=0.25 * VOXEL)
    # the table top holds about a third of the area: the region's boundary closes the table below it
    assert plane.reach > 0.95 and 0.25 < plane.area_share < 0.5
    kept, removed = split_at_plane(vertices, faces, plane, margin=0.02)
    kept_vertices = vertices[np.unique(kept)]
    np.testing.assert_allclose(np.linalg.norm(kept_vertices - CENTRE, axis=1), 0.3, atol=0.5 * VOXEL)
    assert kept_vertices[:, 2].min() > TABLE_Z + 0.02
    # the ball's cap above z = -0.43: 2 pi r h with h = 0.3 + 0.3 - 0.23, within a voxel's band
    kept_area = face_centres_and_areas(vertices, kept)[1].sum()
    np.testing.assert_allclose(kept_area, 2 * np.pi * 0.3 * (0.3 + (CENTRE[2] - (TABLE_Z + 0.02)) + 0.0), rtol=0.1)
    assert len(kept) + len(removed) == len(faces)
    # removed: the table top (z = -0.45), the ball's bottom and the region's boundary below the table
    removed_centres = face_centres_and_areas(vertices, removed)[0]
    assert removed_centres[:, 2].max() < TABLE_Z + 0.02 + VOXEL


def test_no_plane_without_a_table_or_with_cameras_on_both_sides():
    """A ball alone has no wide plane (its largest 'plane' never reaches the region's edge);
    with the table but cameras above AND below it, the table is not a support; nor when the
    cameras look at a point under the table; nor when they are tilted by 90 degrees (the table
    then stands upright in their photos)."""
    vertices, faces = surface(with_table=False)
    assert find_support_plane(vertices, faces, ring(0.8), radius=1.0) is None
    vertices, faces = surface(with_table=True)
    both_sides = np.concatenate([ring(0.8), ring(-1.5)])
    assert find_support_plane(vertices, faces, both_sides, radius=1.0) is None
    assert find_support_plane(vertices, faces, ring(0.8, target=(0.0, 0.0, -0.8)), radius=1.0) is None
    sideways = ring(0.8).copy()
    sideways[:, :, :2] = np.stack([sideways[:, :, 1], -sideways[:, :, 0]], axis=2)  # x, y axes turned 90 deg
    assert find_support_plane(vertices, faces, sideways, radius=1.0) is None


def scene_points(rng: np.random.Generator, with_table: bool = True, below: int = 0) -> np.ndarray:
    """What a capture's triangulated points hold: the table top z = -0.45 (a ring of 600 points
    around the object, none under it), the ball's upper half (400: the photos see no
    underside) and `below` stray points under the table -> [N, 3]"""
    parts = []
    if with_table:
        r = np.sqrt(rng.uniform(0.35**2, 1.5**2, 600))
        t = rng.uniform(0, 2 * np.pi, 600)
        parts.append(np.stack([r * np.cos(t), r * np.sin(t), np.full(600, TABLE_Z)], axis=1))
    u = rng.normal(size=(400, 3))
    u[:, 2] = np.abs(u[:, 2])
    parts.append(CENTRE + 0.3 * u / np.linalg.norm(u, axis=1, keepdims=True))
    parts.append(np.stack([rng.uniform(-1, 1, below), rng.uniform(-1, 1, below), rng.uniform(-0.9, -0.6, below)], axis=1))
    return np.concatenate(parts)


def test_support_plane_from_points_finds_the_table_under_the_object():
    """600 table points at z = -0.45, 400 on the ball above it, 20 strays below (2%, under
    max_below's 5%): the plane is z = -0.45 (n = (0, 0, 1), d = 0.45), holding 600 / 1020 of
    the points. Cutting the surface WITHOUT its table (what an unmasked run leaves) 0.03 below
    it keeps the ball down to z = -0.48, where it sinks into the table, and removes the rest."""
    points = scene_points(np.random.default_rng(0), below=20)
    plane = support_plane_from_points(points, ring(0.8), radius=1.0, tolerance=0.02)
    assert plane is not None
    np.testing.assert_allclose(plane.normal, [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(plane.offset, -TABLE_Z, atol=1e-6)
    np.testing.assert_allclose(plane.area_share, 600 / 1020)
    vertices, faces = surface(with_table=False)
    kept, removed = split_at_plane(vertices, faces, plane, margin=-0.03)
    assert vertices[np.unique(kept)][:, 2].min() > TABLE_Z - 0.03
    assert face_centres_and_areas(vertices, removed)[0][:, 2].max() < TABLE_Z - 0.03 + VOXEL
    assert len(removed) > 0 and len(kept) + len(removed) == len(faces)


def test_support_plane_from_points_refuses_what_is_not_a_support():
    """No plane when: the cameras stand on both sides of the table; the ball alone (its lowest
    band, a ring at the equator, holds under min_share once min_share is 0.2); fewer than 3
    points. With 110 of 1110 points under the table (10%: it is not the lowest thing the photos
    see) the table is refused at max_below 0.05 and accepted at 0.15."""
    rng = np.random.default_rng(1)
    points = scene_points(rng)
    assert support_plane_from_points(points, np.concatenate([ring(0.8), ring(-1.5)]), radius=1.0) is None
    strays = scene_points(rng, below=110)
    table = support_plane_from_points(strays, ring(0.8), radius=1.0, max_below=0.15)
    np.testing.assert_allclose(table.offset, -TABLE_Z, atol=1e-6)
    other = support_plane_from_points(strays, ring(0.8), radius=1.0)
    assert other is None or abs(other.offset + TABLE_Z) > 0.05 or other.normal[2] < 0.99
    assert support_plane_from_points(scene_points(rng, with_table=False), ring(0.8), radius=1.0, min_share=0.2) is None
    assert support_plane_from_points(points[:2], ring(0.8), radius=1.0) is None


def test_export_falls_back_to_the_photos_points(monkeypatch):
    """systems/export.py: the surface without its table holds no support plane, so the plane
    comes from the photos' points (here the stand-in of scene_points, triangulated once for two
    meshes) and the cut lies export.isolate_points_margin (-0.03) from it; with
    export.isolate_from_points=false the surface is kept whole."""
    from types import SimpleNamespace

    import systems.export as export

    calls = []

    def fake_points(images, intrinsics, c2w):
        calls.append(len(images))
        return scene_points(np.random.default_rng(0))

    monkeypatch.setattr(export, "sparse_points", fake_points)
    c2w = ring(0.8)
    views = SimpleNamespace(c2w=c2w, images=np.zeros((12, 4, 4, 3), np.uint8), intrinsics=np.zeros((12, 3, 3)))
    dataset = SimpleNamespace(views=views, split={"train": list(range(1, 12)), "test": [0]})
    model = SimpleNamespace(config=SimpleNamespace(radius=1.0), has_prior_plane=False)
    vertices, faces = surface(with_table=False)
    exporter = export.MeshExport(model, dataset, export.ExportConfig(isolate=True), None)
    for _ in range(2):
        kept, removed = exporter.isolate(vertices, faces)
        assert len(removed) > 0 and len(kept) + len(removed) == len(faces)
        assert vertices[np.unique(kept)][:, 2].min() > TABLE_Z - 0.03
        assert vertices[np.unique(removed)][:, 2].min() < TABLE_Z - 0.03
    assert calls == [11]  # the training views only, once
    off = export.MeshExport(model, dataset, export.ExportConfig(isolate=True, isolate_from_points=False), None)
    kept, removed = off.isolate(vertices, faces)
    assert removed is None and len(kept) == len(faces)
    # with the table in the surface the cut is 0.02 above the surface's plane, unless the model was
    # trained with a prior plane (the opacity prior spared what lies below the photos' plane)
    vertices, faces = surface(with_table=True)
    kept, _ = exporter.isolate(vertices, faces)
    assert vertices[np.unique(kept)][:, 2].min() > TABLE_Z + 0.02 - 1e-6
    model.has_prior_plane = True
    kept, _ = exporter.isolate(vertices, faces)
    assert TABLE_Z - 0.03 < vertices[np.unique(kept)][:, 2].min() < TABLE_Z + 0.02 - 1e-6


def test_opacity_prior_spares_what_the_cut_removes(monkeypatch):
    """systems/neus.py start_training with loss.opacity_spares_support: the model's prior plane
    is the photos' support plane (scene_points' table at z = TABLE_Z) moved to the export's cut,
    isolate_points_margin (-0.03) from it: n = (0, 0, 1), d = -TABLE_Z + 0.03. Without the
    export's cut, or without the prior, no plane is set."""
    from types import SimpleNamespace

    import systems.export as export
    from systems.neus import NeuSTask

    monkeypatch.setattr(export, "sparse_points", lambda images, intrinsics, c2w: scene_points(np.random.default_rng(0)))
    views = SimpleNamespace(c2w=ring(0.8), images=np.zeros((12, 4, 4, 3), np.uint8), intrinsics=np.zeros((12, 3, 3)))
    dataset = SimpleNamespace(views=views, split={"train": list(range(12)), "test": []})

    def start(lambda_opacity=0.01, spares=True, **export_keys):
        planes = []
        model = SimpleNamespace(config=SimpleNamespace(radius=1.0), background=object(), has_prior_plane=False,
                                set_prior_plane=lambda n, d: planes.append((np.asarray(n), d)))
        task = NeuSTask.__new__(NeuSTask)
        task.model, task.full_config = model, SimpleNamespace(export=export.ExportConfig(isolate=True, **export_keys))
        task.config = SimpleNamespace(loss=SimpleNamespace(lambda_opacity=lambda_opacity, opacity_spares_support=spares))
        task.mesh = export.MeshExport(model, dataset, task.full_config.export, None)
        task.start_training()
        return planes

    (normal, offset), = start()
    np.testing.assert_allclose(normal, [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(offset, -TABLE_Z + 0.03, atol=1e-6)
    assert start(isolate_from_points=False) == []
    assert start(lambda_opacity=0.0) == [] and start(spares=False) == []
