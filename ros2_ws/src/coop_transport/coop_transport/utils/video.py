"""mp4 writing for rollouts (imageio's bundled ffmpeg; no system ffmpeg needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def mp4_writer_available() -> str | None:
    """None if mp4 files can be written here, else the reason (imageio's ffmpeg plugin needs imageio-ffmpeg;
    without it imageio would silently pick another format for the .mp4 name, or fail mid-run)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as error:  # ImportError, or the bundled binary missing
        return f"no ffmpeg for imageio ({type(error).__name__}: {error}); pip install imageio-ffmpeg"
    return None


class VideoWriter:
    """Collects (H, W, 3) uint8 frames and writes an H.264 mp4 atomically on ``close()``."""

    def __init__(self, path: str | os.PathLike, fps: int = 20):
        self.path = Path(path)
        self.fps = fps
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"video frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        self.frames.append(frame)

    def close(self) -> Path:
        import imageio.v2 as imageio

        if not self.frames:
            raise ValueError(f"no frames to write to {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp" + self.path.suffix)
        # macro_block_size=1 keeps odd sizes exact instead of resizing with a warning.
        with imageio.get_writer(tmp, format="FFMPEG", fps=self.fps, codec="libx264", quality=7, macro_block_size=1) as writer:
            for frame in self.frames:
                writer.append_data(frame)
        os.replace(tmp, self.path)
        return self.path


def side_by_side(*images: np.ndarray) -> np.ndarray:
    """Concatenate same-height images horizontally."""
    return np.concatenate(images, axis=1)
