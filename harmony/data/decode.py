"""Decode a clip window from a media container with PyAV (docs/DATA.md "Your own videos"): frames at a fixed fps, mono
audio.

The window. A clip (its video stream's extent, or the manifest's ``[start, end)`` part of it) is sampled
in a video window of ``D = frames / fps`` seconds **centred** on it (GRID-like speech clips have silence
at both ends), starting no earlier than time 0; frame k is the frame on screen at ``v0 + k / fps``. The audio
window of ``A = audio_seconds`` is concentric with the video window (``a0 = v0 + D/2 − A/2``), so audio
and video stay in sync whatever A and D are; audio outside the clip is zeros. Frames past the clip end
repeat the last frame. Times are relative to the container's start time.

Frames are resized (shorter side → ``image_size``, area interpolation, pixel aspect ignored) and centre
cropped. Audio is resampled and mixed to mono by PyAV's ``AudioResampler``, placed by its timestamps.

Problems come back in two ways: ``ClipError(kind, detail)`` when the clip cannot give video
(``missing_file``, ``no_video``, ``decode_error``, or ``truncated`` before half the window's frames),
and ``Clip.problems`` for a usable clip with a defect (``truncated`` later in the window: the last frame
is repeated and the audio zero-padded; ``no_audio``). Decoding runs single-threaded: DataLoader workers
give the parallelism.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import av
import numpy as np
import torch

from harmony.nvtx import nvtx_range

# Seek (to the keyframe before the window) only when the window starts this late; short clips decode
# faster from the start, and some MPEG-PS files seek imprecisely.
SEEK_MIN_S = 4.0
# A target time matches a frame whose timestamp is at most this much later (pts rounding).
_EPS = 1e-3

Source = Union[str, bytes, bytearray, memoryview, os.PathLike]


class ClipError(Exception):
    """The clip gives no usable video; ``kind`` is a bad-input kind from ``harmony.data.batch.BAD_KINDS``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Clip:
    """A decoded window: video [3, T, H, W] float32 in [0,1], audio [S] float32 in [-1,1]."""

    video: torch.Tensor
    audio: torch.Tensor
    has_audio: bool
    v0: float                    # video window start (s, relative to the clip start)
    a0: float                    # audio window start (s)
    duration: Optional[float]    # end of the video stream (s from the clip start) when known
    problems: List[Tuple[str, str]] = field(default_factory=list)
    seeked: bool = False         # decoding started from a seek (long clips), not from the clip start


def clip_window(duration: Optional[float], start: Optional[float], end: Optional[float],
                frames: int, fps: float, audio_seconds: float, clip_start: float = 0.0) -> Tuple[float, float]:
    """(v0, a0): video window centred on [start, end) (default the video's [clip_start, duration)), not
    before 0; audio window concentric with it."""
    span = frames / fps
    lo = float(start) if start is not None else clip_start
    hi = float(end) if end is not None else duration
    v0 = lo if hi is None else max(0.0, 0.5 * (lo + hi) - 0.5 * span)
    return v0, v0 + 0.5 * span - 0.5 * audio_seconds


def _cut_short(src: Source) -> bool:
    """True when an ISO-BMFF file (mp4, mov, m4a: a sequence of sized boxes) ends inside a top-level box, the
    sign of a truncated download or copy; False for other containers or when the layout is intact."""
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            fh, size = io.BytesIO(bytes(src)), len(src)
        else:
            fh, size = open(src, "rb"), os.path.getsize(src)
        with fh:
            head = fh.read(8)
            if len(head) < 8 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
                return False
            pos = 0
            while pos + 8 <= size:
                fh.seek(pos)
                hdr = fh.read(16)
                box = int.from_bytes(hdr[:4], "big")
                if box == 1 and len(hdr) >= 16:
                    box = int.from_bytes(hdr[8:16], "big")
                if box == 0:  # runs to the end of the file
                    return False
                if box < 8:
                    return False  # not a box layout we can judge
                pos += box
            return pos > size
    except OSError:
        return False


def _open(src: Source):
    """Open a container from a path or from in-memory bytes (shards)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(src)), mode="r")
    return av.open(os.fsdecode(src) if isinstance(src, bytes) else src, mode="r")


def _video_extent(container, vstream, origin: float) -> Tuple[float, Optional[float]]:
    """(start, end) of the video stream in seconds from the clip start (end None when unknown). The video
    stream, not the container, decides: an audio track may be longer than the pictures."""
    tb = vstream.time_base
    lo = float(vstream.start_time * tb) - origin if vstream.start_time is not None and tb else 0.0
    if vstream.duration and tb:
        return lo, lo + float(vstream.duration * tb)
    if container.duration is not None and container.duration > 0:
        return lo, container.duration / av.time_base
    return lo, None


def _origin(container) -> float:
    """Container start time in seconds (stream timestamps are shifted by it)."""
    start = container.start_time
    return start / av.time_base if start is not None and start > -(2 ** 62) else 0.0


class _FrameSampler:
    """Keeps the frame on screen at each target time while frames stream by in decode order."""

    def __init__(self, v0: float, frames: int, fps: float, size: int):
        self.targets = v0 + np.arange(frames) / fps
        self.size = size
        self.out: List[Optional[np.ndarray]] = [None] * frames
        self.k = 0
        self.prev = None
        self.prev_arr: Optional[np.ndarray] = None
        self.last_time: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.k >= len(self.targets)

    def _array(self, frame) -> np.ndarray:
        """Resize (shorter side → size, area filter) and centre-crop: [size, size, 3] uint8."""
        w, h = frame.width, frame.height
        scale = self.size / min(w, h)
        w2, h2 = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        arr = frame.to_ndarray(format="rgb24", width=w2, height=h2, interpolation="AREA")
        y, x = (h2 - self.size) // 2, (w2 - self.size) // 2
        return arr[y:y + self.size, x:x + self.size]

    def add(self, frame, t: float) -> None:
        """Feed one decoded frame shown from time ``t``."""
        while self.k < len(self.targets) and t > self.targets[self.k] + _EPS:
            if self.prev is None:  # window starts before the first frame: use the first frame
                self.prev, self.prev_arr = frame, None
            if self.prev_arr is None:
                self.prev_arr = self._array(self.prev)
            self.out[self.k] = self.prev_arr
            self.k += 1
        self.prev, self.prev_arr, self.last_time = frame, None, t

    def finish(self) -> np.ndarray:
        """Fill targets past the last frame with it: [T, size, size, 3] uint8 (needs ≥ 1 frame)."""
        if self.k < len(self.targets):
            last = self._array(self.prev) if self.prev_arr is None else self.prev_arr
            for k in range(self.k, len(self.targets)):
                self.out[k] = last
        return np.stack(self.out)


class _AudioCollector:
    """Resamples to ``rate`` and writes the channel mean by timestamp into the window [a0, a0 + n/rate).

    The mix to mono is a plain mean over channels done here: FFmpeg's own downmix adds channels with
    gains above 1/C and clips loud stereo speech (GRID's mp2 tracks peak at full scale)."""

    def __init__(self, a0: float, n: int, rate: int, origin: float):
        self.rate, self.origin = rate, origin
        self.first = int(round(a0 * rate))  # window start in output samples since the clip start
        self.buf = np.zeros(n, dtype=np.float32)
        self.covered = 0                    # samples written inside the window
        self.pos: Optional[int] = None      # next output sample position (clip samples)
        self.resampler = None

    @property
    def done(self) -> bool:
        return self.pos is not None and self.pos >= self.first + len(self.buf)

    def add(self, frame) -> None:
        """Feed a decoded audio frame (None flushes the resampler)."""
        if self.resampler is None:
            if frame is None:
                return
            self.resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=self.rate)
        for out in self.resampler.resample(frame):
            if out.pts is not None and out.time_base is not None:
                pos = int(round((float(out.pts * out.time_base) - self.origin) * self.rate))
            else:
                pos = self.pos if self.pos is not None else 0
            data = out.to_ndarray().mean(axis=0, dtype=np.float32)  # planar [C, n] → mono [n]
            lo, hi = max(pos, self.first), min(pos + len(data), self.first + len(self.buf))
            if hi > lo:
                self.buf[lo - self.first:hi - self.first] = data[lo - pos:hi - pos]
                self.covered += hi - lo
            self.pos = pos + len(data)


def _frame_time(frame, origin: float, fallback: float) -> float:
    """Presentation time of a decoded frame relative to the clip start."""
    return float(frame.time) - origin if frame.pts is not None and frame.time is not None else fallback


def _feed_audio(collector: "_AudioCollector", frame, problems: List[Tuple[str, str]], name: str) -> bool:
    """Give one audio frame (None: flush) to the collector; a resampling failure masks the audio only."""
    try:
        collector.add(frame)
        return True
    except Exception as exc:
        problems.append(("no_audio", f"{name}: audio resampling failed: {exc!r}"))
        return False


def _decode_audio_only(src: Source, collector: "_AudioCollector") -> Optional[str]:
    """Decode a separate audio container (e.g. a shard's wav) into ``collector``; an error text or None."""
    try:
        with _open(src) as container:
            if not container.streams.audio:
                return "no audio stream"
            stream = container.streams.audio[0]
            collector.origin = _origin(container)
            for frame in container.decode(stream):
                collector.add(frame)
                if collector.done:
                    break
            collector.add(None)
    except Exception as exc:  # undecodable audio masks the audio only
        return f"audio decode failed: {exc!r}"
    return None


@nvtx_range("data/decode_clip")
def decode_clip(src: Source, frames: int, fps: float, image_size: int, sample_rate: int,
                audio_seconds: float, start: Optional[float] = None, end: Optional[float] = None,
                audio_src: Optional[Source] = None, name: str = "") -> Clip:
    """Decode the sampling window of one clip (see the module docstring for the window rule).

    src: a path or the container's bytes; audio_src: a separate audio container (else the clip's own
    audio stream). Returns ``Clip`` (video [3, T, H, W], audio [S], S = round(sample_rate·audio_seconds));
    raises ``ClipError`` when no video can be had.
    """
    name = name or (os.fsdecode(src) if isinstance(src, (str, os.PathLike)) else "<bytes>")
    if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
        raise ClipError("missing_file", f"{name} does not exist")
    n_audio = int(round(sample_rate * audio_seconds))
    try:
        container = _open(src)
    except Exception as exc:
        if isinstance(exc, EOFError) or _cut_short(src):
            raise ClipError("truncated", f"cannot open {name}: the file ends early ({exc!r})") from None
        raise ClipError("decode_error", f"cannot open {name}: {exc!r}") from None
    with container:
        return _decode_open(container, frames, fps, image_size, sample_rate, audio_seconds, n_audio,
                            start, end, audio_src, name)


def _decode_open(container, frames, fps, image_size, sample_rate, audio_seconds, n_audio,
                 start, end, audio_src, name) -> Clip:
    """``decode_clip`` on an open container."""
    if not container.streams.video:
        raise ClipError("no_video", f"{name} has no video stream")
    vstream = container.streams.video[0]
    vstream.thread_count = 1
    astream = container.streams.audio[0] if (container.streams.audio and audio_src is None) else None
    origin = _origin(container)
    clip_start, duration = _video_extent(container, vstream, origin)
    v0, a0 = clip_window(duration, start, end, frames, fps, audio_seconds, clip_start)
    sampler = _FrameSampler(v0, frames, fps, image_size)
    collector = _AudioCollector(a0, n_audio, sample_rate, origin)
    rate = float(vstream.average_rate or vstream.guessed_rate or 25)
    problems: List[Tuple[str, str]] = []
    error = None
    seeked = False
    if min(v0, a0) > SEEK_MIN_S:
        try:  # to the keyframe at or before a point safely ahead of both windows
            container.seek(int((min(v0, a0) - 1.0 + origin) * av.time_base), backward=True)
            seeked = True
        except Exception:  # an unseekable stream: decode from the start
            try:
                container.seek(0)
            except Exception:
                pass
    streams = [vstream] + ([astream] if astream is not None else [])
    audio_ok = astream is not None
    t_next = 0.0
    try:
        for packet in container.demux(*streams):
            is_video = packet.stream.index == vstream.index
            if (is_video and sampler.done) or (not is_video and (collector.done or not audio_ok)):
                if sampler.done and (collector.done or not audio_ok):
                    break
                continue
            try:
                decoded = packet.decode()
            except Exception as exc:
                if is_video:
                    raise
                audio_ok = False  # a broken audio stream masks the audio and keeps the video
                problems.append(("no_audio", f"{name}: audio decode failed: {exc!r}"))
                continue
            for frame in decoded:
                if is_video:
                    t = _frame_time(frame, origin, t_next)
                    t_next = t + 1.0 / rate
                    sampler.add(frame, t)
                elif audio_ok:
                    audio_ok = _feed_audio(collector, frame, problems, name)
        if audio_ok:
            audio_ok = _feed_audio(collector, None, problems, name)
    except Exception as exc:
        error = exc
    if sampler.prev is None:
        raise ClipError("decode_error", f"no video frame decoded from {name}"
                        + (f": {error!r}" if error is not None else ""))
    if sampler.k == 0 and sampler.last_time + 1.5 / rate < sampler.targets[0]:
        raise ClipError("decode_error", f"window starting at {v0:.3f}s lies after the end of {name} "
                        f"(last frame at {sampler.last_time:.3f}s)")
    if not sampler.done:
        # The content should reach the window end unless the container (or the manifest's "end") says the
        # clip is shorter; MPEG-PS has no index, so a cut .mpg just looks like a shorter clip.
        claimed = end if end is not None else duration
        expected_end = v0 + frames / fps if claimed is None else min(v0 + frames / fps, claimed)
        if error is not None or (claimed is not None and sampler.last_time + 2.0 / rate < expected_end):
            detail = (f"{name}: decoding stopped at {sampler.last_time:.3f}s inside the window "
                      f"[{v0:.3f}, {v0 + frames / fps:.3f})s" + (f" ({error!r})" if error is not None else ""))
            if sampler.k < frames / 2:  # mostly a frozen last frame: not worth training on
                raise ClipError("truncated", detail + "; fewer than half the frames decoded")
            problems.append(("truncated", detail))
    video = torch.from_numpy(sampler.finish()).permute(3, 0, 1, 2).float().div_(255.0)
    if audio_src is not None:
        err = _decode_audio_only(audio_src, collector)
        audio_ok = err is None
        if err is not None:
            problems.append(("no_audio", f"{name}: {err}"))
    elif astream is None:
        problems.append(("no_audio", f"{name} has no audio stream"))
    if audio_ok and collector.covered == 0:
        audio_ok = False
        problems.append(("no_audio", f"{name}: no audio inside the window [{a0:.3f}, "
                         f"{a0 + audio_seconds:.3f})s"))
    audio = torch.from_numpy(collector.buf) if audio_ok else torch.zeros(n_audio)
    audio = torch.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-1.0, 1.0)
    return Clip(video=video.contiguous(), audio=audio, has_audio=audio_ok, v0=v0, a0=a0,
                duration=duration, problems=problems, seeked=seeked)
