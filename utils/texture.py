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


def box_groups(order: np.ndarray, extent: np.ndarray, budget: int):
    """Consecutive groups of `order` (triangle ids sorted by box area) whose boxes, padded to the
    group's largest width and height, hold at most `budget` pixels together (a single box may be
    larger) -> yields (group ids [G], box [2]). extent: [F, 2] box widths and heights."""
    start = 0
    while start < len(order):
        first = extent[order[start]]
        stop = min(len(order), start + max(1, budget // int(first[0] * first[1])))
        box = extent[order[start:stop]].max(axis=0)
        while stop - start > 1 and (stop - start) * box[0] * box[1] > budget:
            stop = start + (stop - start) // 2
            box = extent[order[start:stop]].max(axis=0)
        yield order[start:stop], box
        start = stop


def rasterize_atlas(
    uv: np.ndarray, faces: np.ndarray, size: int, margin: float = EDGE_MARGIN, budget: int = 1 << 16
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
    for group, box in box_groups(order, extent, budget):
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


# ---------------------------------------------------------------------------------------------
# Colour from the training views: which cameras see a surface point, how much each counts.
# Cameras follow process_data.base.pixel_directions: OpenCV axes (x right, y down, z forward),
# pixel (row, col) has its centre at (u, v) = (col, row) (integers, no half-pixel offset).
# ---------------------------------------------------------------------------------------------


def project(points: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pinhole projection of points into C cameras.

    x_cam = R^T (p - o)  (R = c2w[:, :3], o = c2w[:, 3]),  [u z, v z, z] = K x_cam,
    one 3x4 matrix a camera: P = K [R^T | -R^T o], [u z, v z, z] = P [p, 1].
    points [N, 3], intrinsics [C, 3, 3], c2w [C, 3, 4] -> uv [C, N, 2] (u = column, v = row),
    z [C, N] (depth along the optical axis; <= 0 behind the camera)."""
    rotation_t = np.transpose(c2w[:, :, :3], (0, 2, 1))  # R^T [C, 3, 3]
    extrinsic = np.concatenate([rotation_t, -rotation_t @ c2w[:, :, 3:]], axis=2)  # [C, 3, 4]
    matrix = intrinsics @ extrinsic  # [C, 3, 4]
    pix = np.tensordot(matrix[:, :, :3], points, axes=([2], [1])) + matrix[:, :, 3:]  # [C, 3, N]
    z = pix[:, 2]
    safe = np.where(np.abs(z) > 1e-12, z, 1e-12)
    return np.stack([pix[:, 0] / safe, pix[:, 1] / safe], axis=-1), z


def depth_map(uv: np.ndarray, z: np.ndarray, faces: np.ndarray, width: int, height: int, near: float = 1e-3,
              budget: int = 1 << 16) -> np.ndarray:
    """z-buffer of a mesh in one camera: the depth of the nearest triangle at each pixel centre.

    uv [V, 2] pixel coordinates of the vertices (see project), z [V] their depths, faces [F, 3]
    -> depth [height, width] float32, inf where no triangle covers the pixel centre.
    Perspective-correct: 1/z is affine in screen space, so at a pixel centre with screen-space
    barycentrics b, 1/z = sum_i b_i / z_i. A centre on an edge counts for both triangles
    (b_i >= -1e-6), so a closed mesh leaves no cracks. Triangles with a corner nearer than
    `near` are skipped. Vectorised over triangles in groups of similar bounding box (about
    `budget` candidate pixels a group), as rasterize_atlas."""
    depth = np.full(height * width, np.inf, dtype=np.float32)
    if len(faces) == 0:
        return depth.reshape(height, width)
    corners = uv[faces].astype(np.float64)  # [F, 3, 2]
    inv_z = 1.0 / np.where(z > near, z, np.nan)[faces]  # [F, 3] (nan: behind or too near)
    lo = np.ceil(corners.min(axis=1)).astype(np.int64)  # [F, 2] first pixel centre (u, v)
    hi = np.floor(corners.max(axis=1)).astype(np.int64)  # [F, 2] last pixel centre
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # [F] twice the signed screen area
    valid = (np.abs(area2) > 1e-12) & (hi >= lo).all(axis=1) & np.isfinite(inv_z).all(axis=1)
    extent = hi - lo + 1
    order = np.flatnonzero(valid)
    order = order[np.argsort(extent[order, 0] * extent[order, 1], kind="stable")]
    for group, box in box_groups(order, extent, budget):
        ox, oy = np.meshgrid(np.arange(box[0]), np.arange(box[1]), indexing="xy")
        ox, oy = ox.reshape(1, -1), oy.reshape(1, -1)  # [1, K]
        pu, pv = lo[group, :1] + ox, lo[group, 1:] + oy  # [G, K] pixel centres
        in_box = (ox < extent[group, :1]) & (oy < extent[group, 1:])
        c = corners[group]
        inv_depth = np.zeros(pu.shape)
        inside = in_box
        for i in range(3):  # b_i = twice the area of (p, corner_{i+1}, corner_{i+2}) / area2
            a, b = c[:, (i + 1) % 3], c[:, (i + 2) % 3]
            cross = (b[:, 0] - a[:, 0])[:, None] * (pv - a[:, 1:2]) - (b[:, 1] - a[:, 1])[:, None] * (pu - a[:, 0:1])
            w = cross / area2[group, None]
            inside = inside & (w >= -1e-6)
            inv_depth += w * inv_z[group, i:i + 1]
        g, k = np.nonzero(inside)
        np.minimum.at(depth, pv[g, k] * width + pu[g, k], (1.0 / inv_depth[g, k]).astype(np.float32))
    return depth.reshape(height, width)


def nearest_pixel(images: np.ndarray, uv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Look-up in C single-channel images [C, H, W] at the pixel centres nearest uv [C, N, 2]
    -> values [C, N] (clamped at the border) and inside bool [C, N] (uv within the image)."""
    n_images, height, width = images.shape
    col, row = np.rint(uv[..., 0]), np.rint(uv[..., 1])
    inside = (col >= 0) & (col <= width - 1) & (row >= 0) & (row <= height - 1)
    col = np.clip(np.nan_to_num(col), 0, width - 1).astype(np.int64)
    row = np.clip(np.nan_to_num(row), 0, height - 1).astype(np.int64)
    return images.reshape(-1)[(np.arange(n_images)[:, None] * height + row) * width + col], inside


def depth_test(uv: np.ndarray, z: np.ndarray, depth: np.ndarray, tolerance) -> np.ndarray:
    """Which points C cameras see: uv [C, N, 2] and z [C, N] (see project), depth [C, H, W]
    their z-buffers (depth_map) -> bool [C, N]: in front of the camera, projecting inside the
    image, and at most `tolerance` (a number or [C, N]) behind the nearest surface at the
    nearest pixel centre: z <= depth[c, round(v), round(u)] + tolerance."""
    nearest, inside = nearest_pixel(depth, uv)
    return inside & (z > 0) & (z <= nearest + tolerance)


def facing(normals: np.ndarray, points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The cosine between each point's normal and its direction to each camera centre:

        cos = n . (o - p) / |o - p| = (n . o - n . p) / sqrt(|o|^2 - 2 o . p + |p|^2)

    normals [N, 3] unit, points [N, 3], centres [C, 3] -> [C, N]."""
    dot = centres @ normals.T - (normals * points).sum(axis=1)[None]  # [C, N]
    dist2 = (centres ** 2).sum(axis=1)[:, None] - 2.0 * centres @ points.T + (points ** 2).sum(axis=1)[None]
    return dot / np.sqrt(np.maximum(dist2, 1e-24))


def view_weights(cos: np.ndarray, visible: np.ndarray, power: float, min_cos: float) -> np.ndarray:
    """How much each camera counts for each surface point: the frontal-ness of its view,

        w = visible * cos^power,  w = 0 where cos < min_cos,

    cos [C, N] (facing), visible bool [C, N] -> weights [C, N] (unnormalised; 1 for a visible
    head-on view)."""
    return np.where(visible & (cos >= min_cos), np.maximum(cos, 0.0) ** power, 0.0)


def top_views(weights: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k cameras with the largest weights for each point, weights normalised to sum 1.
    weights [C, N] -> view index [N, k], weight [N, k] (a point no camera sees has weights 0;
    its indices are arbitrary). Ties keep no particular order."""
    n_views = weights.shape[0]
    k = min(k, n_views)
    by_point = np.ascontiguousarray(weights.T)  # [N, C]
    if k < n_views:
        index = np.argpartition(-by_point, k - 1, axis=1)[:, :k]  # [N, k]
    else:
        index = np.broadcast_to(np.arange(n_views)[None], by_point.shape).copy()
    w = np.take_along_axis(by_point, index, axis=1)  # [N, k]
    total = w.sum(axis=1, keepdims=True)
    return index, np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)


def sample_image(images: np.ndarray, view: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup in a stack of images [C, H, W, ch] (pixel centres at integer (u, v),
    clamped at the border): view [N] which image, uv [N, 2] where -> [N, ch] float32."""
    height, width = images.shape[1:3]
    x = np.clip(np.nan_to_num(uv[:, 0]), 0, width - 1)
    y = np.clip(np.nan_to_num(uv[:, 1]), 0, height - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None].astype(np.float32), (y - y0)[:, None].astype(np.float32)
    top = images[view, y0, x0] * (1 - fx) + images[view, y0, x1] * fx
    bottom = images[view, y1, x0] * (1 - fx) + images[view, y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
