"""Off-screen camera rendering with MuJoCo's own renderer, and the choice of OpenGL backend.

The backend is chosen by the standard ``MUJOCO_GL`` environment variable, read when MuJoCo is first imported:
``egl`` (the default here: hardware EGL on a GPU machine, Mesa's software EGL elsewhere) or ``osmesa`` (CPU
rendering through OSMesa, needs ``libosmesa6``). ``configure_gl()`` must therefore run before robosuite or mujoco
is imported; ``coop_transport.sim`` calls it on import.

Images are rendered with shadows, reflections and the skybox switched off: software rendering of this scene is
geometry-bound and about 3x faster without them, and the policies never see those effects anyway. Images come out
in the natural orientation (row 0 is the top of the picture), which is robosuite's "opencv" convention.
"""

from __future__ import annotations

import os

import numpy as np

SUPPORTED_GL = ("egl", "osmesa", "glfw")


def configure_gl() -> str:
    """Select the OpenGL backend from ``MUJOCO_GL`` (default ``egl``) before MuJoCo loads; returns it."""
    backend = os.environ.setdefault("MUJOCO_GL", "egl").lower()
    if backend not in SUPPORTED_GL:
        raise ValueError(f"MUJOCO_GL={backend!r} is not supported; use one of {SUPPORTED_GL}")
    if backend in ("egl", "osmesa"):
        # PyOpenGL must agree with MuJoCo on the platform, or context creation fails.
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


class CameraRenderer:
    """Renders RGB images of named cameras from an ``MjModel``/``MjData`` pair at one resolution."""

    def __init__(self, model, height: int, width: int, fast: bool = True):
        import mujoco

        self._mujoco = mujoco
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        # The model's off-screen buffer bounds the image size; grow it if asked for more.
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        self._renderer = mujoco.Renderer(model, height, width)
        self._fast = fast
        self.height, self.width = height, width

    def render(self, data, camera: str) -> np.ndarray:
        """(H, W, 3) uint8 image of ``camera``, row 0 at the top."""
        self._renderer.update_scene(data, camera=camera)
        if self._fast:
            flags = self._renderer.scene.flags
            flags[self._mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            flags[self._mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            flags[self._mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        return self._renderer.render().copy()

    def close(self) -> None:
        # Closing explicitly avoids EGL context destructor errors at interpreter exit.
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
