"""An offline interactive viewer (viser): the mesh (textured where exported), the training
cameras as frustums with their photos, the region of interest, and a button that
volume-renders the browser's current viewpoint.

    python run.py --config F --view [--resume CKPT]          # a trained run
    python run.py --config F --train viewer.enabled=true     # live while training

viser's web client ships inside its wheel: nothing is fetched at run time (no CDN, no share
tunnel; meshes go as plain GLB, no Draco). The server binds viewer.host (127.0.0.1 by
default) and prints the URL. Everything is shown in the dataset's WORLD frame, as the
exported meshes are; cameras follow OpenCV axes (x right, y down, z forward), as viser's do.

All torch work happens on the caller's thread (the training loop between steps, or
serve_forever): the browser's button only queues a request, so a render never runs while
the optimiser changes the parameters.
"""
import glob
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


INITIAL_DISTANCE = 0.85  # the browser's first camera, as a fraction of camera 0's distance


@dataclass
class ViewerConfig:
    enabled: bool = False  # serve the viewer live during --train (run.py --view always serves it)
    host: str = "127.0.0.1"  # 0.0.0.0 to reach it from other machines
    port: int = 8080  # the next free port when taken; 0: any free port
    refresh_every: int = 500  # training steps between refreshes of the live mesh (and the last render)
    mesh_resolution: int = 128  # marching cubes of the live mesh (when no exported mesh is shown)
    render_width: int = 320  # initial width of the volume render of the browser's view
    photo_width: int = 80  # width of the photos shown on the camera frustums
    max_cameras: int = 100  # frustums shown at most (every k-th view beyond that)


def rotation_to_wxyz(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (w, x, y, z)."""
    import viser.transforms as vtf

    return vtf.SO3.from_matrix(rotation).wxyz


def wxyz_to_rotation(wxyz: np.ndarray) -> np.ndarray:
    import viser.transforms as vtf

    return vtf.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix()


def newest_mesh(save_dir: str) -> Optional[str]:
    """The newest exported mesh in save/: a textured GLB when there is one, else a .ply."""
    for pattern in ("it*-mc*-textured.glb", "it*-mc*.ply"):
        found = sorted(glob.glob(os.path.join(save_dir, pattern)))
        if found:
            return found[-1]
    return None


class Viewer:
    """The viser server and the scene of one system (rank 0 only)."""

    def __init__(self, system, config: ViewerConfig):
        import viser

        self.system = system
        self.config = config
        self.dataset = system.dataset
        scale_mat = self.dataset.views.scale_mat
        self.scale = float(np.abs(np.linalg.det(scale_mat[:3, :3])) ** (1 / 3))  # normalised -> world
        self.centre = scale_mat[:3, 3].astype(np.float64)
        self.server = viser.ViserServer(host=config.host, port=config.port, verbose=False)
        self.url = f"http://{config.host}:{self.server.get_port()}"
        self.clients_connected = 0
        self._lock = threading.Lock()
        self._pending = None  # (client id, render width) asked for by the browser
        self._last_request = None  # re-rendered when the live view refreshes
        self.server.on_client_connect(self._on_connect)
        self.frustums = []
        self._build_gui()
        self._build_scene()
        log.info("viewer: %s", self.url)
        print(f"viewer: {self.url}  (Ctrl-C to stop)", flush=True)

    # --- scene --------------------------------------------------------------------------
    def _to_world(self, points: np.ndarray) -> np.ndarray:
        return points * self.scale + self.centre

    def _to_normalised(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) / self.scale

    def _build_scene(self) -> None:
        views = self.dataset.views
        c2w = views.c2w  # [N, 3, 4] normalised frame, OpenCV axes
        up = -c2w[:, :, 1].mean(axis=0)  # the cameras' mean "up" (-y)
        if np.linalg.norm(up) > 1e-6:
            self.server.scene.set_up_direction(tuple(up / np.linalg.norm(up)))
        self.server.scene.add_icosphere(
            "/region", radius=self.scale, position=tuple(self.centre), color=(90, 140, 230), wireframe=True,
            subdivisions=2,
        )
        step = max(1, -(-len(c2w) // self.config.max_cameras))
        height, width = self.dataset.height, self.dataset.width
        photo_w = max(8, min(self.config.photo_width, width))
        stride = max(1, width // photo_w)
        for i in range(0, len(c2w), step):
            fy = views.intrinsics[i][1, 1]
            photo = views.images[i][::stride, ::stride]
            self.frustums.append(self.server.scene.add_camera_frustum(
                f"/cameras/{i:04d}", fov=float(2 * np.arctan(height / (2 * fy))), aspect=width / height,
                scale=0.12 * self.scale, thickness=0.004 * self.scale, image=photo,
                wxyz=rotation_to_wxyz(c2w[i, :, :3]), position=tuple(self._to_world(c2w[i, :, 3])),
                color=(200, 60, 60) if i in self.dataset.split["test"] else (40, 40, 40),
            ))
        # the browser starts on the line from the region's centre to the first camera, a little
        # nearer than it (inside the ring of frustums), looking at the centre
        self.server.initial_camera.position = tuple(self._to_world(INITIAL_DISTANCE * c2w[0, :, 3]))
        self.server.initial_camera.look_at = tuple(self.centre)
        self.server.initial_camera.fov = float(2 * np.arctan(height / (2 * views.intrinsics[0][1, 1])))
        self.show_mesh()

    def show_mesh(self, live: bool = False) -> Optional[str]:
        """The newest exported mesh (textured GLB first) or, when live or none was exported,
        a mesh extracted from the current SDF -> what is shown."""
        path = None if live else newest_mesh(self.system.paths.save_dir)
        if path is not None and path.endswith(".glb"):
            with open(path, "rb") as f:
                self.server.scene.add_glb("/mesh", f.read())
        elif path is not None:
            import trimesh

            self.server.scene.add_mesh_trimesh("/mesh", trimesh.load(path, process=False))
        else:
            mesh = self.live_mesh()
            if mesh is None:
                return None
            self.server.scene.add_mesh_trimesh("/mesh", mesh)
            path = f"live mesh at step {self.system.global_step}"
        log.info("viewer: showing %s", path)
        self.mesh_status.content = f"**Mesh**: {os.path.basename(path)}"
        return path

    def live_mesh(self):
        """Marching cubes on the current SDF at viewer.mesh_resolution, vertex-coloured,
        world frame -> trimesh.Trimesh (None when there is no surface yet)."""
        import trimesh
        from utils.mesh import extract_surface, largest_component, local_grid, remove_unused_vertices, to_world

        model = self.system.model
        model.eval()
        chunk = self.system.full_config.export.mesh_chunk
        vertices, faces = extract_surface(local_grid(model.mesh_sdf, chunk, self.system.device), model.config.radius,
                                          self.config.mesh_resolution, self.system.full_config.export.mesh_threshold)
        if len(faces) == 0:
            return None
        vertices, faces = remove_unused_vertices(vertices, largest_component(faces))
        points = torch.from_numpy(vertices.astype(np.float32)).to(self.system.device)
        colours = model.surface_colors(points, chunk).clamp(0, 1).cpu().numpy()
        model.train()
        mesh = trimesh.Trimesh(vertices=to_world(vertices, self.dataset.views.scale_mat), faces=faces, process=False)
        mesh.visual.vertex_colors = (colours * 255 + 0.5).astype(np.uint8)
        return mesh

    # --- GUI ----------------------------------------------------------------------------
    def _build_gui(self) -> None:
        gui = self.server.gui
        self.mesh_status = gui.add_markdown("**Mesh**: none yet")
        self.width_slider = gui.add_slider("Render width", min=64, max=1024, step=32,
                                           initial_value=self.config.render_width)
        button = gui.add_button("Render this view")
        button.on_click(self._on_render_click)
        self.render_status = gui.add_markdown("Volume render of the browser's view: press the button")
        self.render_image = gui.add_image(np.full((24, 32, 3), 255, np.uint8), label="volume render")
        show_cameras = gui.add_checkbox("Show cameras", initial_value=True)

        @show_cameras.on_update
        def _(_event) -> None:
            for handle in self.frustums:
                handle.visible = show_cameras.value

    def _on_connect(self, client) -> None:
        with self._lock:
            self.clients_connected += 1
        log.info("viewer: client %d connected", client.client_id)

    def _on_render_click(self, event) -> None:
        with self._lock:
            self._pending = (event.client.client_id, int(self.width_slider.value))
        log.info("viewer: client %d asks for a render at width %d", *self._pending)

    # --- the caller's thread --------------------------------------------------------------
    def on_step(self, step: int) -> None:
        """Between training steps: serve a queued render; every refresh_every steps show the
        live mesh and re-render the last requested view."""
        self.serve_pending()
        if self.config.refresh_every > 0 and step % self.config.refresh_every == 0:
            self.show_mesh(live=True)
            if self._last_request is not None:
                self.render_request(*self._last_request)

    def serve_pending(self) -> None:
        with self._lock:
            request, self._pending = self._pending, None
        if request is not None:
            self.render_request(*request)

    def render_request(self, client_id: int, width: int) -> None:
        client = self.server.get_clients().get(client_id)
        if client is None:
            return
        start = time.perf_counter()
        camera = client.camera
        rgb = self.render_pose(wxyz_to_rotation(camera.wxyz), np.asarray(camera.position), float(camera.fov),
                               float(camera.aspect), width)
        self.render_image.image = rgb
        self.render_status.content = (f"Volume render at step {self.system.global_step}, {rgb.shape[1]}x{rgb.shape[0]}, "
                                      f"{time.perf_counter() - start:.1f} s")
        self._last_request = (client_id, width)
        log.info("viewer: rendered the browser's view at step %d, %dx%d", self.system.global_step, rgb.shape[1],
                 rgb.shape[0])

    def render_pose(self, rotation: np.ndarray, position: np.ndarray, fov: float, aspect: float, width: int) -> np.ndarray:
        """Volume-render a camera given in the world frame (OpenCV axes, vertical fov in
        radians, aspect = width / height) -> uint8 RGB [H, W, 3]."""
        height = max(8, int(round(width / aspect)))
        focal = height / (2 * np.tan(fov / 2))
        intrinsics = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=torch.float32)
        c2w = np.concatenate([rotation, self._to_normalised(position)[:, None]], axis=1)
        device = self.system.device
        rays = self.dataset.pose_rays(torch.from_numpy(c2w.astype(np.float32)).to(device), intrinsics.to(device),
                                      width, height)
        was_training = self.system.model.training
        images = self.system.task.evaluation.render_image(rays, height, width)
        self.system.model.train(was_training)
        return (images["rgb"].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (SIGINT) or SIGTERM; renders run on this thread. Only from the
        main thread (signal handlers)."""
        import signal

        def stop(signum, frame):
            raise KeyboardInterrupt

        # both set here: a process started in the background by a shell inherits SIGINT ignored
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:  # a Ctrl-C that comes as soon as the line is out (a script waiting for it) stops cleanly too
            print(f"viewer: serving {self.url} until Ctrl-C", flush=True)
            while True:
                self.serve_pending()
                time.sleep(0.05)
        except KeyboardInterrupt:
            log.info("viewer: stopped")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.server.stop()
