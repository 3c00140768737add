"""De-identification: burned-in headers found and masked, nothing else; keyed pseudonyms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.deid import (
    DARK_LEVEL,
    find_text_bands,
    load_secret,
    mask_text,
    pseudonymise,
)
from common.data.video import read_video
from common.errors import UsageError
from deploy.synth import VENDORS, generate_site


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], np.ndarray]:
    """One decoded synthetic sweep (H.264, burned-in header) per vendor and frame size."""
    out: dict[tuple[str, int], np.ndarray] = {}
    root = tmp_path_factory.mktemp("sweeps")
    for vendor in VENDORS:
        for size in (64, 128):
            site = root / f"{vendor}-{size}"
            generate_site(site, site="s", patients=1, seed=5, vendor=vendor, frames=8, size=size)
            out[vendor, size] = read_video(next((site / "videos").glob("*.mp4")))
    return out


@pytest.mark.parametrize("vendor", sorted(VENDORS))
@pytest.mark.parametrize("size", [64, 128])
def test_every_vendor_header_is_blacked_out_and_the_image_kept(sweeps, vendor, size):
    frames = sweeps[vendor, size]
    header = VENDORS[vendor].header_rows(size)

    masked, found = mask_text(frames)

    # The band ends at the last text row (+1 of margin); the rows after it are black anyway.
    assert header - 3 <= found.top_rows <= header
    assert found.bottom_rows == 0
    assert found.frames_with_text == found.frames == len(frames)
    assert masked[:, :header].max() <= DARK_LEVEL  # no stroke of the text is left
    assert (frames[:, :header] > 128).any()  # ...and there was text to remove
    np.testing.assert_array_equal(masked[:, found.top_rows :], frames[:, found.top_rows :])


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_a_header_at_the_bottom_is_found_too(sweeps, vendor):
    frames = np.ascontiguousarray(sweeps[vendor, 128][:, ::-1])
    found = find_text_bands(frames)
    assert found.top_rows == 0
    assert VENDORS[vendor].header_rows(128) - 3 <= found.bottom_rows


@pytest.mark.parametrize("vendor", sorted(VENDORS))
@pytest.mark.parametrize("size", [64, 128])
def test_tissue_alone_is_never_masked(sweeps, vendor, size):
    image = np.ascontiguousarray(sweeps[vendor, size][:, VENDORS[vendor].header_rows(size) :])
    assert find_text_bands(image).rows == 0


def test_text_seen_in_one_frame_only_is_masked_in_all(sweeps):
    frames = sweeps["vendor-a", 128].copy()
    header = VENDORS["vendor-a"].header_rows(128)
    frames[1:, :header] = 0  # a header shown on the first frame only
    masked, found = mask_text(frames)
    assert found.frames_with_text == 1
    assert found.top_rows >= header - 3
    assert masked[:, :header].max() <= DARK_LEVEL


def test_input_frames_are_not_modified(sweeps):
    frames = sweeps["vendor-b", 64]
    before = frames.copy()
    mask_text(frames)
    np.testing.assert_array_equal(frames, before)


def test_pseudonyms_are_keyed_stable_and_site_specific():
    secret_a, secret_b = b"a" * 32, b"b" * 32
    one = pseudonymise("MRN-0042", secret_a)
    assert one == pseudonymise(" MRN-0042 ", secret_a)
    assert one.startswith("pt-") and len(one) == 3 + 16
    assert "0042" not in one
    assert one != pseudonymise("MRN-0043", secret_a)
    assert one != pseudonymise("MRN-0042", secret_b)


def test_secret_must_be_private_and_long_enough(tmp_path: Path):
    path = tmp_path / "secret"
    path.write_text("0123456789abcdef0123\n")
    path.chmod(0o600)
    assert load_secret(path) == b"0123456789abcdef0123"
    path.chmod(0o640)
    with pytest.raises(UsageError, match="chmod 600"):
        load_secret(path)
    path.write_text("short")
    path.chmod(0o600)
    with pytest.raises(UsageError, match="at least 16 needed"):
        load_secret(path)
    with pytest.raises(UsageError, match="not found"):
        load_secret(tmp_path / "missing")
