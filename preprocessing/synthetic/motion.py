"""Smooth random motion for synthetic talking-head clips (deterministic given the rng)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Named expression components of the synthetic model that clips animate (besides mouth/blink).
EXPRESSIVE = (1, 2, 4, 5, 6, 7, 8, 9)   # smile, brow raise, cheek puff, frown, pucker, ...


@dataclass
class ClipMotion:
    expression: np.ndarray      # (T, 100)
    jaw_pose: np.ndarray        # (T, 3)
    global_orient: np.ndarray   # (T, 3)
    neck_pose: np.ndarray       # (T, 3)
    head_pose: np.ndarray       # (T, 3)
    leye_pose: np.ndarray       # (T, 3)
    reye_pose: np.ndarray       # (T, 3)
    camera_offset: np.ndarray   # (T, 3) camera position jitter (metres, world)

    @classmethod
    def from_arrays(cls, arrays) -> "ClipMotion":
        """From a clip's saved ground truth (a mapping with at least these fields)."""
        return cls(**{k: arrays[k] for k in cls.__dataclass_fields__})


def smooth_noise(rng: np.random.Generator, num_frames: int, fps: float, cutoff_hz: float,
                 dims: int = 1) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, (T, dims)."""
    sigma = fps / (2 * np.pi * cutoff_hz)          # kernel std in frames
    pad = int(np.ceil(4 * sigma)) + 1
    x = rng.normal(size=(num_frames + 2 * pad, dims))
    k = np.exp(-0.5 * (np.arange(-pad, pad + 1) / max(sigma, 1e-3)) ** 2)
    k /= k.sum()
    y = np.stack([np.convolve(x[:, d], k, mode="same") for d in range(dims)], 1)[pad:pad + num_frames]
    return y / max(y.std(), 1e-9)


def sample_clip_motion(rng: np.random.Generator, num_frames: int, fps: float) -> ClipMotion:
    t = np.arange(num_frames) / fps
    expr = np.zeros((num_frames, 100))
    # Talking: syllables at 3-5 Hz under a slow envelope drive the jaw and the lips.
    rate = rng.uniform(3.0, 5.0) + 0.5 * smooth_noise(rng, num_frames, fps, 0.3)[:, 0]
    phase = 2 * np.pi * np.cumsum(rate) / fps + rng.uniform(0, 2 * np.pi)
    envelope = np.clip(0.6 + 0.5 * smooth_noise(rng, num_frames, fps, 0.4)[:, 0], 0, 1)
    syllable = np.maximum(0.0, np.sin(phase)) ** 1.5 * envelope
    jaw = np.zeros((num_frames, 3))
    jaw[:, 0] = 0.02 + 0.2 * syllable
    expr[:, 0] = 1.2 * syllable - 0.2
    # A few expressive components at a time, slowly varying.
    active = rng.choice(EXPRESSIVE, size=rng.integers(2, 5), replace=False)
    for k in active:
        expr[:, k] = rng.uniform(0.3, 0.9) * smooth_noise(rng, num_frames, fps, 0.5)[:, 0] + rng.uniform(-0.1, 0.5)
    expr[:, 10:30] = 0.2 * smooth_noise(rng, num_frames, fps, 0.7, 20)
    # Blinks every 2-5 s, ~150 ms each.
    tb = rng.uniform(0.2, 2.0)
    while tb < t[-1] + 0.5:
        expr[:, 3] += 1.1 * np.exp(-0.5 * ((t - tb) / 0.045) ** 2)
        tb += rng.uniform(2.0, 5.0)
    # Head motion lives on the head and neck joints; SMPL-X's global orientation turns the body
    # about the pelvis (0.6 m below the head), so it only sways the torso a little.
    head = smooth_noise(rng, num_frames, fps, 0.35, 3) * np.array([0.1, 0.2, 0.05])
    neck = smooth_noise(rng, num_frames, fps, 0.5, 3) * np.array([0.04, 0.05, 0.02])
    sway = smooth_noise(rng, num_frames, fps, 0.2, 3) * np.array([0.01, 0.01, 0.005])
    gaze = smooth_noise(rng, num_frames, fps, 0.8, 2) * 0.12
    eye = np.stack([gaze[:, 0], gaze[:, 1], np.zeros(num_frames)], 1)
    cam = smooth_noise(rng, num_frames, fps, 0.3, 3) * 0.004
    return ClipMotion(expression=expr, jaw_pose=jaw, global_orient=sway, neck_pose=neck,
                      head_pose=head, leye_pose=eye, reye_pose=eye.copy(),
                      camera_offset=cam)
