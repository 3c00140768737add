"""Grayscale ultrasound video I/O with PyAV.

Frames are ``uint8`` arrays ``[T, H, W]``: B-mode pixel intensities, one luma plane per
frame. Videos are H.264 in MP4 (libx264, yuv420p). The luma plane is written and read
as is, without a range conversion, so a pixel value only changes by the codec's loss.

FFmpeg opens more than videos: it reads a text file as ANSI art (format ``tty``) and a
picture through an image demuxer (``png_pipe``, ``image2`` ...), each as a short "video".
The readers refuse both by the demuxer's name, and audio cover art by its disposition;
a still image passes only where the caller asks for it (``still=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from common.errors import DataError

# Demuxers that turn text into pictures of characters: not a scan, however it decodes.
_TEXT_FORMATS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
# Demuxers of single pictures, besides every "<codec>_pipe" one. Animations (gif, apng)
# are read as videos.
_IMAGE_FORMATS = frozenset(
    {"image2", "image2pipe", "alias_pix", "brender_pix", "fits", "ico", "txd"}
)

# Pixel formats whose first plane is 8-bit luma that can be read without conversion.
_LUMA_FIRST = frozenset(
    {"gray", "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12"}
)


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, read from its container without decoding it whole.

    Attributes
    ----------
    frames : int
        Number of frames (video packets).
    height, width : int
        Frame size in pixels.
    fps : float
        Average frame rate in frames per second; 0.0 where the container does not say.
    """

    frames: int
    height: int
    width: int
    fps: float


def write_video(path: Path, frames: np.ndarray, *, fps: int) -> None:
    """Write grayscale frames as an H.264 MP4 whose bytes depend only on the input.

    Parameters
    ----------
    path : Path
        Output file; its folder must exist. Overwritten if present.
    frames : np.ndarray
        ``uint8 [T, H, W]``, T >= 1, H and W even (yuv420p halves the chroma planes).
    fps : int
        Frame rate in frames per second, >= 1.

    Notes
    -----
    Encoding is single-threaded and the muxer runs in bit-exact mode (no encoder version
    string, no creation time), so writing the same frames twice gives identical files.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 3 or len(frames) == 0:
        raise ValueError(
            f"frames must be uint8 [T, H, W] with T >= 1, got {frames.dtype} {frames.shape}"
        )
    n, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")

    # Neutral chroma: the frame is gray, and the luma plane carries the pixels unchanged.
    chroma = np.full((height // 2, width), 128, dtype=np.uint8)
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.codec_context.thread_count = 1
        # Macroblock-tree rate control made repeated encodes of the same short clip differ
        # now and then (x264 core 165); without it, and single-threaded, they are identical.
        stream.codec_context.options = {
            "crf": "18",
            "preset": "veryfast",
            "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
        }
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for index in range(n):
            frame = av.VideoFrame.from_ndarray(
                np.concatenate([frames[index], chroma]), format="yuv420p"
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_video_rgb(path: Path, frames: np.ndarray, *, fps: int) -> None:
    """Write colour frames (annotated output for people, not data) as an H.264 MP4.

    Parameters
    ----------
    path : Path
        Output file; its folder must exist. Overwritten if present.
    frames : np.ndarray
        ``uint8 [T, H, W, 3]`` RGB, T >= 1, H and W even (yuv420p halves the chroma planes).
    fps : int
        Frame rate in frames per second, >= 1.

    Notes
    -----
    Converted to yuv420p by FFmpeg's swscale, so colours are subsampled and the luma that
    ``read_video`` returns is the frames' BT.601 brightness, not any one channel.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}"
        )
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"crf": "18", "preset": "veryfast"}
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def read_video(path: Path, *, still: bool = False) -> np.ndarray:
    """Decode every frame of a video to its luma plane.

    Parameters
    ----------
    path : Path
        A video file PyAV can open (any codec; not only those ``write_video`` writes).
    still : bool
        Also accept a still image (PNG, JPEG ...), read as one frame. Default False.

    Returns
    -------
    np.ndarray
        ``uint8 [T, H, W]``, T >= 1.

    Raises
    ------
    DataError
        The file is missing, is a folder, is not a video (text, a still image where
        ``still`` is False, audio), has no frames or fails to decode; the message names
        the file and the reason.
    """
    frames: list[np.ndarray] = []
    container, stream = _open(path, still=still)
    with container:
        try:
            for frame in container.decode(stream):
                frames.append(_luma(frame))
        except av.FFmpegError as error:
            raise DataError(
                f"{path}: decode error at frame {len(frames)}: {_reason(error)}"
            ) from error
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    return np.stack(frames)


def probe_video(path: Path, *, still: bool = False) -> VideoInfo:
    """Read a video's frame count, size and rate, and check that its first frame decodes.

    Counting frames demuxes the packets without decoding them; only the first frame is
    decoded, so a file whose later frames are damaged can still pass.

    ``still`` is as for ``read_video``.

    Raises
    ------
    DataError
        As for ``read_video``.
    """
    container, stream = _open(path, still=still)
    with container:
        count = 0
        first: av.VideoFrame | None = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                count += 1
                if first is None:
                    decoded = packet.decode()
                    first = decoded[0] if decoded else None
            if first is None and count:
                # A decoder with reordering delay returns the first frame only when flushed.
                decoded = stream.codec_context.decode(None)
                first = decoded[0] if decoded else None
        except av.FFmpegError as error:
            raise DataError(f"{path}: decode error: {_reason(error)}") from error
        if count == 0 or first is None:
            raise DataError(f"{path}: the video has no frames")
        rate = stream.average_rate
        return VideoInfo(
            frames=count,
            height=first.height,
            width=first.width,
            fps=float(rate) if rate else 0.0,
        )


def _open(
    path: Path, *, still: bool
) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open a video and its first picture stream, turning every way it can fail into a
    ``DataError``; the caller closes the container."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise DataError(f"{path}: not a readable video: {_reason(error)}") from error
    try:
        stream = _video_stream(path, container, still=still)
    except DataError:
        container.close()
        raise
    return container, stream


def _video_stream(
    path: Path, container: av.container.InputContainer, *, still: bool
) -> av.video.stream.VideoStream:
    """The stream to read, or ``DataError`` saying why the file is not a video."""
    fmt = container.format.name
    if fmt in _TEXT_FORMATS:
        raise DataError(f"{path}: not a video: FFmpeg reads it as text (format {fmt})")
    # Cover art of an audio file is a video stream of one picture.
    pictures = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    if not pictures:
        cover = " (only a cover picture)" if container.streams.video else ""
        raise DataError(f"{path}: the file has no video stream{cover}")
    stream = pictures[0]
    is_image = (
        fmt in _IMAGE_FORMATS
        or fmt.endswith("_pipe")
        or bool(stream.disposition & av.stream.Disposition.still_image)
    )
    if is_image and not still:
        raise DataError(f"{path}: a still image ({stream.codec_context.name}), not a video")
    return stream


def _reason(error: av.FFmpegError) -> str:
    """FFmpeg's message alone: ``str(error)`` adds ``[Errno N]`` and repeats the path."""
    return error.strerror or type(error).__name__


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """The frame's 8-bit luma as ``uint8 [H, W]``, converting only where it must."""
    if frame.format.name not in _LUMA_FIRST:
        frame = frame.reformat(format="gray")
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width].copy()
