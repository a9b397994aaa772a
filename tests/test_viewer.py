"""The textured export at the end of a tiny training run, and the viewer in a real browser:
`run.py --view` serves the run, headless Chromium (Debian's chromium, driven over the
DevTools protocol) opens it, waits for the scene, takes a screenshot, and the screenshot
must show the mesh where it projects; the server must have seen the client connect.

The screenshot is kept as a test artefact: $TEST_ARTIFACTS (default test-artifacts/ in the
repository) / viewer_screenshot.png."""
import base64
import glob
import json
import os
import shutil
import subprocess
import time
import urllib.request

import imageio.v2 as imageio
import numpy as np
import pytest
import trimesh

from tests.conftest import ROOT, start_run_py, stop_run_py, wait_for_line

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--enable-unsafe-swiftshader",  # WebGL in software (no GPU)
]
WINDOW = (800, 600)
ARTIFACTS = os.environ.get("TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))


def test_live_viewer_during_training(demo_run):
    """conftest's demo_run trains with the live viewer on (refreshed every 3 steps): the URL is
    printed, on 127.0.0.1; the live mesh refreshed at steps 3 and 6, then the exported textured
    mesh is shown, and the viewer served until Ctrl-C."""
    output = demo_run.output
    assert "viewer: http://127.0.0.1:" in output
    assert "viewer: showing live mesh at step 3" in output and "viewer: showing live mesh at step 6" in output
    assert "viewer: showing " in output.split("viewer: showing live mesh at step 6")[1]
    assert "-textured.glb" in output.split("viewer: serving")[0].rsplit("viewer: showing", 1)[1]


def test_training_ends_with_a_textured_mesh(demo_run):
    trial = demo_run.trial
    stem = os.path.join(trial, "save", "it000006-mc32")
    for ext in ("obj", "mtl", "png", "glb"):
        assert os.path.isfile(f"{stem}-textured.{ext}"), ext
    plain = trimesh.load(f"{stem}.ply", process=False)
    obj = trimesh.load(f"{stem}-textured.obj", process=False, force="mesh")
    glb = trimesh.load(f"{stem}-textured.glb", force="mesh")
    assert len(obj.faces) == len(glb.faces) <= max(1000, len(plain.faces))
    assert obj.visual.material.image.size == (256, 256)
    # the same world frame as today's mesh
    np.testing.assert_allclose(obj.bounds, plain.bounds, atol=0.05 * np.ptp(plain.vertices, axis=0).max())


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """Headless Chromium driven over the DevTools protocol (websockets, which viser brings)."""

    def __init__(self, executable: str, profile: str):
        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return imageio.imread(data)[..., :3]

    def close(self):
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)


def mesh_silhouette(mesh: trimesh.Trimesh, position, look_at, up, fov: float, size) -> np.ndarray:
    """Pixels the mesh covers, seen by viser's look-at camera (OpenCV axes, vertical fov)."""
    from utils.mesh import rasterize_silhouette

    z = np.asarray(look_at, float) - position
    z /= np.linalg.norm(z)
    y = -(up - np.dot(up, z) * z)
    y /= np.linalg.norm(y)
    x = np.cross(y, z)
    rotation = np.stack([x, y, z])  # world -> camera
    w, h = size
    focal = h / 2 / np.tan(fov / 2)
    K = np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]])
    world_mat = K @ np.concatenate([rotation, -rotation @ np.asarray(position)[:, None]], axis=1)
    return rasterize_silhouette(np.asarray(mesh.vertices), np.asarray(mesh.faces), world_mat, size)


def test_viewer_in_headless_chromium(demo_run, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    scene, trial = demo_run.scene, demo_run.trial
    server, lines = start_run_py(["--view", "--resume", trial, *demo_run.overrides, "viewer.port=0",
                                  "viewer.render_width=64"])
    log = []
    browser = None
    try:
        url = wait_for_line(server, lines, log, "viewer: http://127.0.0.1:").split("viewer: ")[1].split()[0]
        browser = DevTools(chromium, str(tmp_path / "profile"))
        browser.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                     mobile=False)
        browser.call("Page.navigate", url=url)
        check_screenshot(browser, scene, trial)
        # the button volume-renders the browser's view (on the server's main thread)
        clicked = browser.call("Runtime.evaluate", expression=(
            "(() => { const b = [...document.querySelectorAll('button')]"
            ".find(b => b.textContent.includes('Render this view')); if (b) b.click(); return !!b; })()"))
        assert clicked["result"]["value"] is True
        wait_for_line(server, lines, log, "viewer: rendered the browser's view", timeout=120)
    finally:
        if browser is not None:
            browser.close()
        output = stop_run_py(server, lines, log)
    assert "viewer: client 0 connected" in output, output[-3000:]
    assert server.returncode == 0, output[-3000:]


def check_screenshot(browser, scene, trial):
    """Wait until the mesh shows where it projects from the initial camera, keep the
    screenshot, and check it: not blank, the mesh's pixels off the background and of the
    texture's hue, background around it."""
    # what the first view must show: the exported textured mesh, seen from viser's initial camera
    from systems.viewer import INITIAL_DISTANCE
    from process_data.dtu import load_neus_scene

    views = load_neus_scene(scene, "cameras_sphere.npz", 1, use_masks=False)
    centre, scale = views.scale_mat[:3, 3], views.scale_mat[0, 0]
    c2w = views.c2w
    position = centre + scale * INITIAL_DISTANCE * c2w[0, :, 3]
    up = -c2w[:, :, 1].mean(axis=0)
    up /= np.linalg.norm(up)
    fov = 2 * np.arctan(views.images.shape[1] / (2 * views.intrinsics[0][1, 1]))
    (glb,) = glob.glob(os.path.join(trial, "save", "*-textured.glb"))
    mesh = trimesh.load(glb, force="mesh")
    silhouette = mesh_silhouette(mesh, position, centre, up, fov, WINDOW)
    import cv2

    inner = cv2.erode(silhouette.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    outer = cv2.dilate(silhouette.astype(np.uint8), np.ones((25, 25), np.uint8)) == 0
    # the GUI panel (top right) and notifications (top left) cover the canvas there
    covered = np.zeros(silhouette.shape, bool)
    covered[:300, WINDOW[0] - 350:] = True
    covered[:160, :330] = True
    inner &= ~covered
    assert inner.sum() > 500, "the mesh should project onto the middle of the window"

    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), np.float32) / 255
    mean_texture = texture.reshape(-1, 3).mean(axis=0)
    shot, on_mesh = None, 0.0
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the scene: the mesh's pixels stop being background
        time.sleep(2)
        shot = browser.screenshot().astype(np.float32) / 255
        background = np.median(shot[outer & ~covered], axis=0)
        differs = np.abs(shot - background).max(axis=-1) > 0.08
        on_mesh = differs[inner].mean()
        if on_mesh > 0.9:
            break
    os.makedirs(ARTIFACTS, exist_ok=True)
    artefact = os.path.join(ARTIFACTS, "viewer_screenshot.png")
    imageio.imwrite(artefact, (shot * 255).astype(np.uint8))
    print(f"screenshot: {artefact}")

    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    assert shot.reshape(-1, 3).std(axis=0).max() > 0.03, "blank canvas"
    assert on_mesh > 0.9, f"only {on_mesh:.0%} of the mesh's pixels differ from the background ({artefact})"
    # object-coloured: the mesh's pixels have the texture's hue (shading scales brightness)
    pixels = shot[inner].mean(axis=0)
    cosine = pixels @ mean_texture / (np.linalg.norm(pixels) * np.linalg.norm(mean_texture))
    assert cosine > 0.97, (pixels, mean_texture)
    assert np.abs(shot[outer & ~covered] - background).max(axis=-1).mean() < 0.1
