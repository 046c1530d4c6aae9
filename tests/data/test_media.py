"""Images and videos in: every mode to RGB, orientation and rotation honoured, bad files named; mp4 out."""

import io
import struct
import warnings
import zlib

import av
import numpy as np
import pytest
from PIL import Image, ImageOps

from musubi_tuner.data import media
from musubi_tuner.errors import UserError


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB(A) PNG (Pillow cannot write one)."""
    height, width, channels = array.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red stays red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = media.load_image(tmp_path / "a.png")
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8 and (out[..., 0] == 200).all()


@pytest.mark.parametrize("mode", ["LA", "P", "L", "CMYK", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (8, 6), (255, 255, 255)).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    image.save(path)
    out = media.load_image(path)
    assert out.shape == (6, 8, 3) and out.min() > 240


def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.array([[0, 32896, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert media.load_image(tmp_path / "g.png")[0, :, 0].tolist() == [0, 128, 255]


def test_16_bit_rgb_keeps_its_colours(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint16)
    pixels[..., 0], pixels[..., 1] = 65535, 32896
    (tmp_path / "c.png").write_bytes(png16(pixels))
    assert media.load_image(tmp_path / "c.png")[0, 0].tolist() == [255, 128, 0]


def test_exif_orientation_is_applied_to_pixels_and_size(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert media.image_size(tmp_path / "phone.jpg") == (20, 40)
    out = media.load_image(tmp_path / "phone.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the left half is now on top


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_displays_as_pillow_displays_it(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(media.load_image(tmp_path / "o.png"), upright)
    assert media.image_size(tmp_path / "o.png") == (upright.shape[1], upright.shape[0])


def test_corrupt_exif_is_said_once_naming_the_image(tmp_path, caplog):
    # an EXIF block whose first directory entry points past its end: Pillow warns in two lines naming no file
    path = tmp_path / "exifbad.jpg"
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(path, exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning would fail here
        assert media.image_size(path) == (10, 8)
        assert media.load_image(path).shape == (8, 10, 3)
    said = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{path}: Corrupt EXIF data") and "not applied" in said[0]


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_images_name_the_file(tmp_path, content, caplog):
    path = tmp_path / "bad.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        content = buffer.getvalue()[:200]
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.png: (empty file|not a readable image)"):
        media.load_image(path)
    assert "EXIF" not in caplog.text  # (a truncated file is not said to hold a corrupt EXIF block)


def moving_bar(frames=10, height=16, width=32):
    video = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        video[i, :, i * 2:i * 2 + 6] = (255, 0, 0)
    return video


def test_a_written_video_reads_back_with_its_frames(tmp_path):
    path = media.write_video(tmp_path / "v.mp4", moving_bar(), fps=24)
    video = media.load_video(path)
    assert video.frames.shape == (10, 16, 32, 3) and video.size == (32, 16)
    assert video.frames[3, 8, 7, 0] > 200 and video.frames[3, 8, 20, 0] < 50
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # written atomically


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)  # display turned 90 degrees counter-clockwise
        frame = np.zeros((16, 32, 3), np.uint8)
        frame[:, :8] = 255  # white at the left edge -> bottom edge once rotated
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    video = media.load_video(path)
    assert video.size == (16, 32) and video.frames.shape == (3, 32, 16, 3)
    assert video.frames[0, -8:].mean() > 200 and video.frames[0, :16].mean() < 50
    assert media.video_size(path) == (16, 32)


def _with_display_matrix(path, matrix):
    """`path`, an mp4 whose track header's display matrix is replaced by `matrix` (a, b, c, d in 16.16 fixed point, as
    a phone's front camera or an editor writes a mirrored video)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    offset = at + 8 + (32 if data[at + 4] == 1 else 20) + 16  # version/flags, times and ids, reserved, layer ... volume
    a, b, c, d = (int(v * 65536) for v in matrix)
    struct.pack_into(">9i", data, offset, a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("matrix, shown", [
    ((1, 0, 0, 1), lambda f: f), ((-1, 0, 0, 1), lambda f: f[:, ::-1]), ((1, 0, 0, -1), lambda f: f[::-1]),
    ((-1, 0, 0, -1), lambda f: f[::-1, ::-1]), ((0, -1, 1, 0), lambda f: np.rot90(f)),  # (90 degrees: the test above)
    ((0, 1, 1, 0), lambda f: f.transpose(1, 0, 2)), ((0, -1, -1, 0), lambda f: f[::-1, ::-1].transpose(1, 0, 2)),
    ((0, 0, 0, 0), lambda f: f),  # degenerate: ignored, as players ignore it
])
def test_a_display_matrix_is_applied_as_players_apply_it_mirrors_included(tmp_path, matrix, shown):
    """fuzz_ag 1c: a mirrored matrix's angle (-180) was applied as a rotation, turning a horizontally mirrored video
    upside down, and an all-zero one (angle INT_MIN) turned the frames by a quarter. x' = a x + c y, y' = b x + d y."""
    frame = np.zeros((16, 32, 3), np.uint8)
    frame[:, :8, 0] = 255  # red at the left edge
    frame[:4, :, 1] = 255  # green at the top
    path = tmp_path / "v.mp4"
    media.write_video(path, np.stack([frame] * 3))
    video = media.load_video(_with_display_matrix(path, matrix))
    expected = shown(frame)
    assert video.frames.shape[1:] == expected.shape
    assert np.abs(video.frames[0].astype(int) - expected).mean() < 12  # (H.264's loss)


def test_a_very_large_image_is_one_line_naming_it_not_pillows_warning(tmp_path):
    """fuzz_ag 4: an image past Pillow's MAX_IMAGE_PIXELS (89.5 M, here lowered to 1,000) printed Pillow's two-line
    DecompressionBombWarning, naming no file, for every image in a caching run. (In a process of its own: pytest shows
    every warning whatever the filters.)"""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "big.png")
    script = ("import logging, sys\nfrom PIL import Image\nImage.MAX_IMAGE_PIXELS = 1000\nlogging.basicConfig()\n"
              "from musubi_tuner.data import media\nprint(media.load_image(sys.argv[1]).shape)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.png")], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "(30, 40, 3)"
    assert done.stderr.strip() == f"WARNING:musubi_tuner.data.media:{tmp_path / 'big.png'}: 40x30, 1,200 pixels: decoding it takes about 0.0 GB"


def test_a_video_whose_tags_are_not_utf8_is_read(tmp_path):
    """fuzz_ag 0: a title in Latin-1 (cameras, old tools) made PyAV's strict tag decoding raise UnicodeDecodeError: a
    traceback in V2V, "UnicodeDecodeError" in caching, for a video every player plays."""
    source = tmp_path / "v.mkv"
    with av.open(str(source), "w") as container:
        container.metadata["title"] = "Cafe holiday"
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 * i, np.uint8), format="rgb24")))
        container.mux(stream.encode())
    latin1 = tmp_path / "latin1.mkv"
    latin1.write_bytes(source.read_bytes().replace(b"Cafe holiday", b"Caf\xe9 holiday"))
    assert media.load_video(latin1).frames.shape == (3, 32, 32, 3)
    assert media.video_size(latin1) == (32, 32)


@pytest.mark.parametrize("prefix", ["", "frame_"])
def test_frames_numbered_without_leading_zeros_are_said_to_be_read_in_name_order(tmp_path, caplog, prefix):
    """fuzz_ag 8e: frames 1.png ... 12.png are read 1, 10, 11, 12, 2, ... (as musubi-tuner reads them), silently; fuzz_bc 8:
    frame_1.png ... (ffmpeg's %d) were not said."""
    import logging

    from PIL import Image

    for i in range(1, 13):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / f"{prefix}{i}.png")
    with caplog.at_level(logging.WARNING):
        frames = media.load_video(tmp_path).frames
        media.video_size(tmp_path)
    assert [round(f[0, 0, 0] / 20) for f in frames] == [1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9]
    first = ", ".join(f"{prefix}{i}.png" for i in (1, 10, 11, 12))
    assert caplog.messages == [f"{tmp_path}: frames are read in name order, as musubi-tuner reads them: {first}, ... (not in "
                               "number order); name them with leading zeros (01.png, frame_01.png) to read them in order"]


def test_decoding_stops_once_enough_frames_are_kept(monkeypatch, tmp_path):
    pulled = []

    def counting_frames(path):
        for i in range(1000):
            pulled.append(i)
            yield np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(media, "_decoded_frames", counting_frames)
    (tmp_path / "v.mp4").write_bytes(b"x")
    assert len(media.load_video(tmp_path / "v.mp4", max_frames=25).frames) == 25
    assert len(pulled) == 25


def test_source_fps_drops_frames_as_musubi_tuner():
    assert media.kept_source_frames(10, 30.0) == [0, 2, 3, 4, 5, 7, 8, 9]  # 4 of every 5
    assert len(media.kept_source_frames(100, 30.0)) == 80
    assert media.kept_source_frames(5, 24.0) == [0, 1, 2, 3, 4]
    assert media.kept_source_frames(5, 12.0) == [0, 1, 2, 3, 4]  # slower sources keep every frame


def test_source_fps_applies_while_decoding(tmp_path):
    path = media.write_video(tmp_path / "v.mp4", np.repeat(moving_bar(1), 30, axis=0), fps=30)
    assert len(media.load_video(path, source_fps=30.0).frames) == 24
    assert len(media.load_video(path, source_fps=30.0, max_frames=9).frames) == 9


def test_a_folder_of_images_is_a_video_in_name_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (2, 0, 1):
        Image.new("RGB", (8, 4), (i * 100, 0, 0)).save(folder / f"f{i:03d}.png")
    (folder / "notes.txt").write_text("ignored")
    video = media.load_video(folder)
    assert video.frames[:, 0, 0, 0].tolist() == [0, 100, 200]


def test_frames_of_different_sizes_need_a_resize(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (8, 4)).save(folder / "a.png")
    Image.new("RGB", (4, 8)).save(folder / "b.png")
    with pytest.raises(UserError, match="frame 1 is 4x8, the first is 8x4"):
        media.load_video(folder)
    resized = media.load_video(folder, resize=lambda frame, first: np.zeros((4, 8, 3), np.uint8))
    assert resized.frames.shape == (2, 4, 8, 3)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"\x00" * 5000, "not a readable video")])
def test_unreadable_videos_name_the_file(tmp_path, content, reason):
    (tmp_path / "bad.mp4").write_bytes(content)
    with pytest.raises(UserError, match=f"bad.mp4: {reason}"):
        media.load_video(tmp_path / "bad.mp4")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = media.write_video(tmp_path / "v.mp4", moving_bar())
    before = path.read_bytes()
    with pytest.raises(Exception):
        media.write_video(path, moving_bar(), codec="no-such-codec")
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_listing_is_by_extension_any_case_and_sorted_without_hidden_files(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.txt", "d.Mp4", "._a.jpg", ".d.mp4"):  # macOS resource forks, editors' leftovers
        (tmp_path / name).touch()
    assert [p.name for p in media.list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in media.list_videos(tmp_path)] == ["d.Mp4"]


def test_an_image_past_pillows_decompression_bomb_limit_is_one_error_naming_it(tmp_path, monkeypatch):
    """Pillow refuses to open an image of more than twice Image.MAX_IMAGE_PIXELS (a 20000x20000 PNG by default);
    the limit is lowered here so that a small image crosses it, as a huge one does."""
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    for read in (media.load_image, media.image_size):
        with pytest.raises(UserError, match=r"huge\.png: too large to open \(Image size \(10000 pixels\) exceeds limit .*\); downscale it"):
            read(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_loaded_and_resized_image_is_writable_so_torch_takes_it_without_a_warning(tmp_path, mode):
    """torch.from_numpy warns on stderr about a read-only array (what np.asarray of a Pillow image is): I2V generation
    showed that warning."""
    import warnings

    import torch

    from musubi_tuner.data.buckets import resize_to_bucket

    path = tmp_path / "x.png"
    Image.new(mode, (40, 24)).save(path)
    loaded = media.load_image(path)
    for array in (loaded, resize_to_bucket(loaded, (64, 48)), resize_to_bucket(loaded, (16, 16))):
        assert array.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.from_numpy(array)


def test_a_png_with_a_large_compressed_text_chunk_is_read_for_its_pixels(tmp_path):
    """fuzz_bc 10: a workflow a generator embeds as a compressed text chunk, inflating past Pillow's 1 MB per chunk, made
    the image "not a readable image" though its pixels are fine."""
    import json

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps({"nodes": [{"id": i, "w": ["x" * 100]} for i in range(15000)]}), zip=True)
    pixels = np.full((48, 80, 3), 100, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "comfy.png", pnginfo=info)
    assert (tmp_path / "comfy.png").stat().st_size < 200_000  # (the text inflates to 1.6 MB)
    assert np.array_equal(np.asarray(media.load_image(tmp_path / "comfy.png")), pixels)


def test_a_palette_image_with_partial_transparency_is_read_without_a_library_warning_and_a_float_image_with_nan_is_refused(
        tmp_path, recwarn):
    """fuzz_bc 6: a palette PNG with partial alpha (pngquant's) printed Pillow's two-line warning naming no file; one NaN
    pixel in a float image left its peak NaN, and the image came out black, cached without a word."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.arange(8, dtype=np.uint8)[None] * 30
    Image.fromarray(rgba, "RGBA").quantize(8).save(tmp_path / "p.png", transparency=bytes(range(0, 240, 30)))
    assert Image.open(tmp_path / "p.png").mode == "P"
    pixels = media.load_image(tmp_path / "p.png")
    assert pixels.shape == (8, 8, 3) and not [w for w in recwarn if "Palette" in str(w.message)]
    floats = np.tile(np.linspace(0, 1, 16, dtype=np.float32)[None], (8, 1))
    floats[0, 0] = np.nan
    Image.fromarray(floats).save(tmp_path / "nan.tiff")
    with pytest.raises(UserError, match=r"nan\.tiff: not a readable image \(1 of its pixels are NaN or infinite\)"):
        media.load_image(tmp_path / "nan.tiff")


def test_a_video_of_non_square_pixels_is_read_as_players_show_it(tmp_path):
    """fuzz_bc 7: a video whose pixels are not square (a 16:9 DVD's 720x480, SAR 32:27) was bucketed and trained as stored,
    squeezed, where players (and the docs' "as players apply them") widen it."""
    from fractions import Fraction

    path = tmp_path / "sar.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert av.open(str(path)).streams.video[0].sample_aspect_ratio == 2
    assert media.video_size(path) == (128, 48)
    assert media.load_video(path).frames.shape == (3, 48, 128, 3)
