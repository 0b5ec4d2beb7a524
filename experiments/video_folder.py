"""The user's videos (``data.root``): a folder of video files (decoded with PyAV), of frame folders
(one folder of images per video), or UCF-101's layout (class folders, its official test list as
``data.split_file``); split by a hash of the relative path as the images task splits images; clips
of ``data.frames`` frames every ``data.frame_stride``-th, a random start, crop and flip in training,
evenly spread centre-cropped clips in validation; unreadable and too-short videos counted
(:class:`experiments.image_folder.Note`), never fatal. docs/training.md ("Video") gives the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from experiments.config import ConfigError
from experiments.image_folder import IMAGE_SUFFIXES, ImageList, Note, _in_val, to_rgb

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".gif", ".mov", ".m4v")
MAX_TRIES = 16  # readable substitutes tried for an unusable training video


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") for p in parts)


def _frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=lambda p: p.name)


def _walk(root: Path) -> list[Path]:
    """Video files and frame folders (a folder that holds images directly), sorted by relative path."""
    found = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if _hidden(parts):
            continue
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            found.append(path)
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
            found.append(path)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file()):
        found.append(root)  # the root itself is one frame folder
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _split_names(split_file: str) -> set[str]:
    """Relative paths of UCF-101's ``testlist0N.txt`` (or a ``trainlist`` line's first word)."""
    path = Path(split_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.split_file={split_file!r} does not exist: give the list of validation videos "
                          f"(UCF-101's ucfTrainTestlist/testlist01.txt), or null for the hash split")
    names = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line.split()[0].replace("\\", "/"))
    return names


def list_videos(root: str | Path, val_fraction: float, split_file: str | None = None) -> ImageList:
    """Find and split the videos of ``root``; a ConfigError naming the problem if there are none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} is not a folder: give a folder of videos "
                          f"({'/'.join(s[1:] for s in VIDEO_SUFFIXES)}), of frame folders, or UCF-101's class folders")
    videos = _walk(root)
    relative = [p.relative_to(root).as_posix() for p in videos]
    if split_file:
        names = _split_names(split_file)
        val = tuple(p for p, r in zip(videos, relative, strict=True) if r in names)
        train = tuple(p for p, r in zip(videos, relative, strict=True) if r not in names)
        skipped = tuple(sorted(names - set(relative)))
        listing = ImageList(root, train, val, "split list", skipped)
    else:
        val = tuple(p for p, r in zip(videos, relative, strict=True) if _in_val(r, val_fraction))
        train = tuple(p for p, r in zip(videos, relative, strict=True) if not _in_val(r, val_fraction))
        listing = ImageList(root, train, val, "hash split")
    if not videos:
        raise ConfigError(f"data.root={str(root)!r} holds no videos ({'/'.join(s[1:] for s in VIDEO_SUFFIXES)} "
                          f"files or folders of frames): point it at a folder that has some (searched recursively)")
    if not listing.train:
        raise ConfigError(f"data.root={str(root)!r}: no training videos ({listing.layout}, {len(listing.val)} "
                          f"validation): add videos or lower data.val_fraction={val_fraction}")
    if not listing.val:
        raise ConfigError(f"data.root={str(root)!r}: no validation videos ({listing.layout}, {len(listing.train)} "
                          f"training): raise data.val_fraction={val_fraction}"
                          + (" or check data.split_file's paths (relative to data.root)" if split_file else ""))
    return listing


class Unusable(ValueError):
    """A video that cannot give a clip: ``kind`` is "unreadable" or "short"."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


@dataclass(frozen=True)
class Clip:
    """Where a clip is cut: frames ``start, start + stride, ...`` (``frames`` of them)."""

    frames: int
    stride: int
    resolution: int

    @property
    def length(self) -> int:
        return (self.frames - 1) * self.stride + 1


def _resize_crop(image: Image.Image, resolution: int, box: tuple[int, int] | None,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(R, R, 3) uint8: shorter side to R, then the crop at ``box`` (chosen now when None)."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if box is None:
        if rng is None:
            box = ((size[0] - resolution) // 2, (size[1] - resolution) // 2)
        else:
            box = (int(rng.integers(0, size[0] - resolution + 1)), int(rng.integers(0, size[1] - resolution + 1)))
    left, top = box
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8), box


def _count_frames(path: Path) -> int:
    """Frames of a video: a frame folder's images, or the stream's count (decoded when it has none)."""
    if path.is_dir():
        return len(_frame_files(path))
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames > 0:
                next(container.decode(stream))  # the header can lie: one frame must decode
                return stream.frames
            return sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, IndexError, StopIteration, OSError, ValueError) as e:
        raise Unusable("unreadable", f"{path}: {type(e).__name__}: {e}") from None


def _decode(path: Path, first: int, clip: Clip) -> list[Image.Image]:
    """Frames ``first, first + stride, ...`` of a video file as RGB images; fewer if it ends first.
    Seeks to the keyframe before ``first`` by timestamp; decodes from the start where that fails."""
    if first > 0:
        try:
            return _frames(path, first, clip, seek=True)
        except Exception:  # noqa: BLE001 - no timestamps, no rate, a seek past the frame: the slow way
            pass
    return _frames(path, first, clip, seek=False)


def _frames(path: Path, first: int, clip: Clip, seek: bool) -> list[Image.Image]:
    import av

    wanted = set(range(first, first + clip.length, clip.stride))
    out: list[Image.Image] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        indexed = enumerate(container.decode(stream))
        if seek:
            rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
            container.seek(start + int(first / rate / base), stream=stream, backward=True, any_frame=False)
            indexed = ((round(float((f.pts - start) * base * rate)), f) for f in container.decode(stream))
        for n, (index, frame) in enumerate(indexed):
            if seek and n == 0 and index > first:
                raise ValueError(f"the seek landed on frame {index}, past {first}")
            if index in wanted:
                out.append(frame.to_image())
            if index >= first + clip.length - 1:
                break
    return out


def read_clip(path: Path, clip: Clip, rng: np.random.Generator | None, start: int | None = None,
              total: int | None = None) -> Tensor:
    """(3, frames, R, R) uint8 from a video file or frame folder: from ``start``, or a random start
    (``rng``), or the middle; a random crop and flip with ``rng``, else the centre. Unusable if the
    video cannot be read or is shorter than the clip."""
    try:
        total = _count_frames(path) if total is None else total
        if total < clip.length:
            raise Unusable("short", f"{path}: {total} frame{'s' if total != 1 else ''}, under the clip's "
                                    f"{clip.length} (data.frames={clip.frames}, data.frame_stride={clip.stride})")
        if start is None:
            start = int(rng.integers(0, total - clip.length + 1)) if rng is not None else (total - clip.length) // 2
        if path.is_dir():
            files = _frame_files(path)[start:start + clip.length:clip.stride]
            images = []
            for f in files:
                with Image.open(f) as image:
                    images.append(to_rgb(image))
        else:
            images = _decode(path, start, clip)
        if len(images) < clip.frames:
            raise Unusable("short", f"{path}: ended after {start + len(images) * clip.stride} frames, under the "
                                    f"clip's {start + clip.length} (it said {total})")
    except Unusable:
        raise
    except Exception as e:  # what PyAV and Pillow raise for a damaged file: reported, never fatal
        raise Unusable("unreadable", f"{path}: {type(e).__name__}: {e}") from None
    box, frames = None, []
    for image in images:
        array, box = _resize_crop(image, clip.resolution, box, rng)
        frames.append(array)
    video = np.stack(frames)  # (T, R, R, 3)
    if rng is not None and rng.random() < 0.5:
        video = video[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).contiguous()


class TrainVideos(torch.utils.data.Dataset):
    """Items ``(index, sample_seed)`` -> ``(clip or None, [notes of the videos skipped])``."""

    def __init__(self, files: tuple[Path, ...], clip: Clip):
        self.files, self.clip = files, clip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, list[Note]]:
        index, seed = item
        notes: list[Note] = []
        rng = np.random.default_rng(seed)
        for k in range(min(MAX_TRIES, len(self.files))):
            path = self.files[(index + k) % len(self.files)]
            try:
                return read_clip(path, self.clip, rng), notes
            except Unusable as e:
                notes.append(Note(e.kind, str(path), str(e)))
        return None, notes


def val_starts(total: int, clip: Clip, per_video: int) -> list[int]:
    """Up to ``per_video`` clip starts spread evenly over a video of ``total`` frames (not overlapping)."""
    room = total - clip.length
    n = max(1, min(per_video, total // clip.length))
    return [round(room * (i + 0.5) / n) if n > 1 else room // 2 for i in range(n)]


def check_val_videos(files: tuple[Path, ...], clip: Clip, clips: int) -> tuple[list[tuple[Path, int, int]], list[Note]]:
    """The validation clips, ``(path, start, frames in the video)``, about ``clips`` of them evenly
    spread over the usable videos, and the notes of the unusable videos (each counted once, here)."""
    usable, notes = [], []
    for path in files:
        try:
            total = _count_frames(path)
        except Unusable as e:
            notes.append(Note(e.kind, str(path), str(e)))
            continue
        if total < clip.length:
            notes.append(Note("short", str(path), f"{path}: {total} frame{'s' if total != 1 else ''}, under the clip's "
                                                  f"{clip.length} (data.frames={clip.frames}, "
                                                  f"data.frame_stride={clip.stride})"))
            continue
        usable.append((path, total))
    per_video = max(1, math.ceil(clips / max(1, len(usable))))
    chosen = [(path, start, total) for path, total in usable for start in val_starts(total, clip, per_video)]
    return chosen[:clips], notes


class ValVideos(torch.utils.data.Dataset):
    """Index -> ``(centre-cropped clip or None, [note])`` of the fixed validation clips."""

    def __init__(self, clips: list[tuple[Path, int, int]], clip: Clip):
        self.clips, self.clip = clips, clip

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[Tensor | None, list[Note]]:
        path, start, total = self.clips[index]
        try:
            return read_clip(path, self.clip, None, start=start, total=total), []
        except Unusable as e:
            return None, [Note(e.kind, str(path), str(e))]


def collate(items: list[tuple[Tensor | None, list[Note]]]) -> tuple[Tensor, list[Note]]:
    """Stack the usable clips; carry the notes of the videos skipped to the main process."""
    clips = [c for c, _ in items if c is not None]
    notes = [note for _, item_notes in items for note in item_notes]
    if not clips:
        return torch.zeros(0, 3, 1, 1, 1, dtype=torch.uint8), notes
    return torch.stack(clips), notes
