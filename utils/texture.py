"""Texture-atlas maths: which triangle covers each texel, where, and seam padding.

Pure numpy (a leaf module). Conventions, written once:
- UVs follow OBJ / trimesh: u to the right, v UP, both in [0, 1]; texel (row, col) of an
  atlas of `size` x `size` texels has its centre at u = (col + 0.5) / size,
  v = 1 - (row + 0.5) / size (row 0 is the top of the PNG).
- Barycentrics b [.., 3] weight a triangle's corners: point = sum_i b_i * corner_i.
"""
from typing import Tuple

import numpy as np

# a texel is covered by a triangle when its centre lies within this many texels of it:
# half a texel's diagonal, so every texel the triangle touches gets a colour (conservative
# rasterisation); bilinear filtering reads those edge texels
EDGE_MARGIN = 0.5 * np.sqrt(2.0)


def uv_to_texel(uv: np.ndarray, size: int) -> np.ndarray:
    """uv [..., 2] (v up) -> continuous texel coordinates (x = column, y = row) [..., 2],
    texel centres at integer + 0.5."""
    return np.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], axis=-1)


def rasterize_atlas(
    uv: np.ndarray, faces: np.ndarray, size: int, margin: float = EDGE_MARGIN, budget: int = 1 << 22
) -> Tuple[np.ndarray, np.ndarray]:
    """Rasterise UV triangles into a size x size atlas, vectorised over triangles.

    uv [V, 2] in [0, 1] (v up), faces [F, 3] indices into uv.
    -> face_id [size, size] int64 (-1 where no triangle), bary [size, size, 3] float32
    (clamped into the triangle, so the point lies on it even for edge texels).

    Each triangle's candidate texels are those of its bounding box grown by `margin`;
    triangles are processed in groups of similar box size, each group padded to its largest
    box (about `budget` candidates per group). A texel within `margin` texels of a triangle
    (signed distance to each edge >= -margin) is covered; where several triangles cover it,
    the one it lies deepest inside wins (the largest smallest edge distance)."""
    n_texels = size * size
    face_id = np.full(n_texels, -1, dtype=np.int64)
    bary_out = np.zeros((n_texels, 3), dtype=np.float32)
    if len(faces) == 0:
        return face_id.reshape(size, size), bary_out.reshape(size, size, 3)
    corners = uv_to_texel(uv, size)[faces].astype(np.float32)  # [F, 3, 2]
    lo = np.floor(corners.min(axis=1) - margin - 0.5).astype(np.int64)  # [F, 2] first texel (x, y)
    hi = np.ceil(corners.max(axis=1) + margin - 0.5).astype(np.int64)  # [F, 2] last texel
    lo, hi = np.clip(lo, 0, size - 1), np.clip(hi, 0, size - 1)
    extent = hi - lo + 1  # [F, 2]
    # twice the signed area; degenerate (zero-area) UV triangles cover nothing
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # [F]
    valid = np.abs(area2) > 1e-12
    order = np.argsort(extent[:, 0] * extent[:, 1], kind="stable")
    order = order[valid[order]]
    best_score = np.full(n_texels, -np.inf, dtype=np.float32)
    start = 0
    while start < len(order):
        # a group of similar boxes, padded to their largest width and height, within budget
        first = extent[order[start]]
        stop = min(len(order), start + max(1, budget // int(first[0] * first[1])))
        box = extent[order[start:stop]].max(axis=0)
        while stop - start > 1 and (stop - start) * box[0] * box[1] > budget:
            stop = start + (stop - start) // 2
            box = extent[order[start:stop]].max(axis=0)
        group = order[start:stop]
        start = stop
        _rasterize_group(corners[group], area2[group], lo[group], extent[group], box, group, size, margin,
                         face_id, bary_out, best_score)
    return face_id.reshape(size, size), bary_out.reshape(size, size, 3)


def _rasterize_group(corners, area2, lo, extent, box, group, size, margin, face_id, bary_out, best_score):
    """rasterize_atlas for one group of triangles, boxes padded to box (w, h); writes in place."""
    ox, oy = np.meshgrid(np.arange(box[0]), np.arange(box[1]), indexing="xy")  # [h, w]
    area2 = area2.astype(np.float32)
    ox, oy = ox.reshape(1, -1), oy.reshape(1, -1)  # [1, K]
    tx, ty = lo[:, :1] + ox, lo[:, 1:] + oy  # [G, K] texel column, row
    inside_box = (ox < extent[:, :1]) & (oy < extent[:, 1:])  # [G, K]
    px, py = (tx + 0.5).astype(np.float32), (ty + 0.5).astype(np.float32)  # texel centres
    # edge functions: b_i = area2 of (p, corner_{i+1}, corner_{i+2}) / area2
    bary = []
    dist = []
    for i in range(3):
        a, b = corners[:, (i + 1) % 3], corners[:, (i + 2) % 3]  # [G, 2] the edge facing corner i
        ex, ey = (b[:, 0] - a[:, 0])[:, None], (b[:, 1] - a[:, 1])[:, None]
        cross = ex * (py - a[:, 1:2]) - ey * (px - a[:, 0:1])  # [G, K] twice the area of (a, b, p)
        w = cross / area2[:, None]  # barycentric of corner i
        bary.append(w)
        # signed distance (texels) from edge (a, b), positive inside
        dist.append(w * np.abs(area2)[:, None] / np.maximum(np.hypot(ex, ey), 1e-12))
    score = np.minimum(np.minimum(dist[0], dist[1]), dist[2])  # [G, K]
    keep = inside_box & (score >= -margin)
    g, k = np.nonzero(keep)
    if len(g) == 0:
        return
    texel = ty[g, k] * size + tx[g, k]
    s = score[g, k]
    weights = np.stack([bary[0][g, k], bary[1][g, k], bary[2][g, k]], axis=-1)  # [M, 3]
    weights = np.clip(weights, 0.0, None)
    weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    # deepest triangle wins, also against earlier groups: sort by score, last write per texel
    sort = np.lexsort((s, texel))
    texel, s, weights, fid = texel[sort], s[sort], weights[sort], group[g[sort]]
    last = np.r_[texel[1:] != texel[:-1], True]
    texel, s, weights, fid = texel[last], s[last], weights[last], fid[last]
    better = s > best_score[texel]
    texel = texel[better]
    best_score[texel] = s[better]
    face_id[texel] = fid[better]
    bary_out[texel] = weights[better]


def dilate(image: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Pad a texture's charts: every empty texel takes the colour of the nearest filled
    texel (Euclidean distance transform), so bilinear filtering and mip-mapping across a
    seam blend with the chart's own colours instead of the empty background (no dark seams).
    image [H, W, C], filled bool [H, W] -> image [H, W, C] (a new array)."""
    if filled.all() or not filled.any():
        return image.copy()
    from scipy.ndimage import distance_transform_edt

    rows, cols = distance_transform_edt(~filled, return_distances=False, return_indices=True)
    return image[rows, cols]


def texel_points(vertices: np.ndarray, faces: np.ndarray, face_id: np.ndarray, bary: np.ndarray):
    """The 3D point of each covered texel: vertices [V, 3], faces [F, 3] (the triangles the
    atlas was rasterised from), face_id [H, W], bary [H, W, 3] -> points [M, 3] and the flat
    indices [M] of the covered texels (row-major)."""
    index = np.flatnonzero(face_id.reshape(-1) >= 0)
    fid = face_id.reshape(-1)[index]
    b = bary.reshape(-1, 3)[index].astype(np.float64)
    points = np.einsum("mi,mij->mj", b, vertices[faces[fid]])
    return points, index


def morton_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """Indices that sort points [N, 3] along a Z-order (Morton) curve, so that neighbours in
    the order are mostly neighbours in space."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = points.min(axis=0), points.max(axis=0)
    q = ((points - lo) / np.maximum(hi - lo, 1e-12) * ((1 << bits) - 1)).astype(np.uint64)  # [N, 3]
    code = np.zeros(len(points), dtype=np.uint64)
    for bit in range(bits):
        for axis in range(3):
            code |= ((q[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return np.argsort(code, kind="stable")


def grid_atlas(vertices: np.ndarray, faces: np.ndarray, size: int, padding: float = 1.0):
    """A per-triangle UV atlas: the triangles, in Z-order of their centroids, go two to a
    square cell of a regular grid over the size x size atlas, each mapped onto one half of
    its cell (the corner with the largest 3D angle onto the right-angled corner), with
    `padding` texels to the cell's border and 1.5 x padding texels across the diagonal.

    Every triangle is its own chart, so the atlas has no distortion beyond each triangle's
    shape, costs O(F) with no optimisation, and fills the square (no packing losses).
    vertices [V, 3], faces [F, 3] ->
      corner_vertex [3F] (the mesh vertex of each UV vertex), uv [3F, 2] (v up),
      uv_faces [F, 3] (= arange(3F) in rows: triangle f uses UV vertices 3f, 3f+1, 3f+2,
      its corners in the winding order of faces[f], started at another corner)."""
    n_faces = len(faces)
    if n_faces == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2)), np.zeros((0, 3), dtype=np.int64)
    # right-angled corner first: the corner with the largest angle (rotation keeps the winding)
    tri = vertices[faces]  # [F, 3, 3]
    angles = []
    for i in range(3):
        a = tri[:, (i + 1) % 3] - tri[:, i]
        b = tri[:, (i + 2) % 3] - tri[:, i]
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-20)
        angles.append(np.arccos(np.clip(cos, -1.0, 1.0)))
    first = np.argmax(np.stack(angles, axis=1), axis=1)  # [F]
    rolled = faces[np.arange(n_faces)[:, None], (first[:, None] + np.arange(3)) % 3]  # [F, 3]
    order = morton_order(tri.mean(axis=1))
    slot = np.empty(n_faces, dtype=np.int64)
    slot[order] = np.arange(n_faces)  # the triangle's place along the curve
    n_cells = (n_faces + 1) // 2
    grid = int(np.ceil(np.sqrt(n_cells)))
    cell = size / grid  # texels
    p, d = padding, 1.5 * padding
    if cell - 2 * p - d < 1.0:
        raise ValueError(f"{n_faces} triangles leave {cell:.1f} texels a cell in a {size}^2 atlas: "
                         f"raise the texture size or lower the face count")
    cell_index = slot // 2
    upper = (slot % 2).astype(bool)
    x0 = (cell_index % grid) * cell  # [F] texel coordinates of the cell's corner (x right, y up)
    y0 = (cell_index // grid) * cell
    lower_corners = np.array([[p, p], [cell - p - d, p], [p, cell - p - d]])  # right angle at the first
    upper_corners = np.array([[cell - p, cell - p], [p + d, cell - p], [cell - p, p + d]])
    local = np.where(upper[:, None, None], upper_corners[None], lower_corners[None])  # [F, 3, 2]
    texel = local + np.stack([x0, y0], axis=-1)[:, None, :]
    uv = (texel / size).reshape(-1, 2)
    return rolled.reshape(-1), uv, np.arange(3 * n_faces, dtype=np.int64).reshape(n_faces, 3)
