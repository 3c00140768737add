"""H.264 video I/O: round trip, byte-for-byte determinism, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from common.data.video import VideoInfo, probe_video, read_video, write_video
from common.errors import DataError


def _frames(seed: int = 0, shape: tuple[int, int, int] = (12, 48, 64)) -> np.ndarray:
    """Smooth moving gradients plus noise: compressible, but not trivially."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    base = 128 + 60 * np.sin(0.15 * x + 0.3 * t) * np.cos(0.1 * y)
    return np.clip(base + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)


def test_round_trip_keeps_shape_and_pixels(tmp_path: Path) -> None:
    frames = _frames()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=12)

    decoded = read_video(path)

    assert decoded.dtype == np.uint8
    assert decoded.shape == frames.shape
    # Lossy, but the luma plane is stored without a range conversion.
    assert np.abs(decoded.astype(int) - frames).mean() < 4
    assert abs(decoded.astype(float).mean() - frames.mean()) < 1


def test_probe_reports_frames_size_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, _frames(), fps=12)

    assert probe_video(path) == VideoInfo(frames=12, height=48, width=64, fps=12.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_frames_give_identical_bytes(tmp_path: Path, seed: int) -> None:
    frames = _frames(seed, (16, 64, 64))
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"

    write_video(first, frames, fps=10)
    write_video(second, frames, fps=10)

    assert first.read_bytes() == second.read_bytes()


def test_write_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16), np.uint8), fps=10)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 16, 16)), fps=10)
    with pytest.raises(ValueError, match="T >= 1"):
        write_video(tmp_path / "empty.mp4", np.zeros((0, 16, 16), np.uint8), fps=10)


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.mp4"
    write_video(good, _frames(), fps=10)
    path = tmp_path / "truncated.mp4"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def _no_frames(tmp_path: Path) -> Path:
    path = tmp_path / "no-frames.mp4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    return path


def _readme(tmp_path: Path) -> Path:
    path = tmp_path / "readme.txt"  # FFmpeg's tty demuxer claims .txt: ANSI art, 3 frames
    path.write_text("# busfed\n\nFederated breast-ultrasound models.\n" * 20)
    return path


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "scan.png"
    Image.fromarray(_frames()[0]).save(path)
    return path


def _jpeg_named_mp4(tmp_path: Path) -> Path:
    path = tmp_path / "scan.mp4"
    Image.fromarray(_frames()[0]).save(path, format="JPEG")
    return path


def _cover_art(tmp_path: Path) -> Path:
    """An MP3 with an album cover: FFmpeg lists the cover as a one-picture video stream."""
    path = tmp_path / "song.mp3"
    with av.open(str(path), mode="w") as container:
        audio = container.add_stream("libmp3lame", rate=44100)
        cover = container.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 64, 48, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.stack([_frames()[0]] * 3, -1), format="rgb24")
        container.mux([*cover.encode(picture), *cover.encode(None)])
        sound = av.AudioFrame.from_ndarray(
            np.zeros((1, 1152), np.int16), format="s16p", layout="mono"
        )
        sound.sample_rate = 44100
        container.mux([*audio.encode(sound), *audio.encode(None)])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "missing.mp4", "file not found"),
        (_text, "not a readable video"),
        (_truncated, "not a readable video"),
        # FFmpeg drops a track without samples, so the file has no video stream.
        (_no_frames, "no video stream|no frames"),
        # What FFmpeg decodes but is not a video.
        (_readme, r"not a video: FFmpeg reads it as text \(format tty\)"),
        (_png, r"a still image \(png\), not a video"),
        (_jpeg_named_mp4, r"a still image \(mjpeg\), not a video"),
        (_cover_art, r"no video stream \(only a cover picture\)"),
        (lambda tmp: tmp, "is a folder, not a file"),
    ],
    ids=[
        "missing", "text", "truncated", "no-frames", "readme", "png", "jpeg-named-mp4",
        "cover-art", "folder",
    ],
)  # fmt: skip
@pytest.mark.parametrize("read", [read_video, probe_video], ids=["read", "probe"])
def test_unreadable_video_raises_data_error_naming_file(
    tmp_path: Path, make, reason: str, read
) -> None:
    path = make(tmp_path)

    with pytest.raises(DataError, match=reason) as caught:
        read(path)

    assert str(caught.value).startswith(f"{path}: ")
    assert "[Errno" not in str(caught.value)
    assert caught.value.exit_code == 3


def test_damaged_stream_raises_data_error(tmp_path: Path) -> None:
    good = tmp_path / "good.mp4"
    write_video(good, _frames(), fps=10)
    data = bytearray(good.read_bytes())
    # Scramble the coded frames between the encoder's header and the index at the end.
    start, end = data.index(b"mbtree=0") + 64, data.index(b"moov") - 8
    data[start:end] = bytes((7 * b + 13) % 256 for b in data[start:end])
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))

    with pytest.raises(DataError, match="decode error"):
        probe_video(path)
    with pytest.raises(DataError, match="decode error"):
        read_video(path)


def test_a_still_image_is_one_frame_where_allowed(tmp_path: Path) -> None:
    path = _png(tmp_path)

    frames = read_video(path, still=True)

    assert frames.shape == (1, 48, 64)
    assert np.array_equal(frames[0], _frames()[0])
    assert probe_video(path, still=True) == VideoInfo(frames=1, height=48, width=64, fps=25.0)


@pytest.mark.parametrize(
    ("fmt", "codec", "pix_fmt"),
    [
        ("avi", "mjpeg", "yuvj420p"),
        ("matroska", "libx264", "yuv420p"),
        ("mov", "libx264", "yuv420p"),
    ],
    ids=["mjpeg-avi", "mkv", "mov"],
)
def test_the_containers_ingest_takes_are_videos(tmp_path: Path, fmt, codec, pix_fmt) -> None:
    path = tmp_path / f"sweep.{fmt}"
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for index, gray in enumerate(_frames()[:3]):
            frame = av.VideoFrame.from_ndarray(gray, format="gray").reformat(format=pix_fmt)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    assert read_video(path).shape == (3, 48, 64)
    assert probe_video(path).frames == 3


def test_a_one_frame_mp4_is_a_video(tmp_path: Path) -> None:
    """Sites store key frames as one-frame MP4s (``busfed site ingest --key-frames``)."""
    path = tmp_path / "key.mp4"
    write_video(path, _frames()[:1], fps=1)

    assert read_video(path).shape == (1, 48, 64)
    assert probe_video(path).frames == 1
