"""Files of a dataset folder that are not what they seem: a FIFO or /dev/zero as a caption or an image, a 1 TiB sparse
caption, broken links, captioned images of a type that is not read. Each is named in the report, in one line, and
never hangs the run (a deadline turns a hang into a failure). All real files, no mocks."""

from __future__ import annotations

import os

from musubi_tuner.data import items, media

from test_files_inputs import deadline  # (tests/ is on the path, as for helpers)
from .test_items import add_image, add_video, image_config, video_config


def test_a_fifo_a_device_and_a_huge_sparse_file_as_captions_are_named_and_the_others_read(tmp_path):
    dataset = image_config(tmp_path)
    folder = tmp_path / "images"
    for name in ("good", "fifo", "zero", "huge"):
        add_image(tmp_path, name, caption=None)
    (folder / "good.txt").write_text("a good caption")
    os.mkfifo(folder / "fifo.txt")
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "huge.txt").write_bytes(b"")
    os.truncate(folder / "huge.txt", 2**40)
    report = items.CacheReport()
    with deadline():
        captions = items.caption_items(dataset, report)
    assert [c.caption for c in captions] == ["a good caption"]
    failed = {os.path.basename(path): reason for path, reason in report.failed}
    assert failed == {
        "fifo.png": f"{folder / 'fifo.txt'}: not a regular file (a FIFO); expected a caption file (for fifo.png)",
        "zero.png": f"{folder / 'zero.txt'}: not a regular file (a character device); expected a caption file (for zero.png)",
        "huge.png": f"{folder / 'huge.txt'}: 1 TiB, too large for a caption file (at most 1 MiB) (for huge.png)",
    }


def test_a_fifo_named_like_an_image_is_reported_not_dropped(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "good")
    os.mkfifo(tmp_path / "images" / "pipe.png")
    (tmp_path / "images" / "pipe.txt").write_text("a pipe")
    report = items.CacheReport()
    with deadline():
        list(items.iter_latent_batches(dataset, report, num_workers=0))
    assert report.failed == [(str(tmp_path / "images" / "pipe.png"),
                              f"{tmp_path / 'images' / 'pipe.png'}: not a regular file (a FIFO); expected a file")]


def test_a_broken_or_looping_caption_link_is_named_as_such(tmp_path):
    dataset = image_config(tmp_path)
    folder = tmp_path / "images"
    add_image(tmp_path, "broken", caption=None)
    add_image(tmp_path, "loop", caption=None)
    (folder / "broken.txt").symlink_to(folder / "gone.txt")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    found, problems = items.list_items(dataset)
    assert found == []
    assert dict(problems) == {
        str(folder / "broken.png"): f"{folder / 'broken.txt'}: broken symbolic link (to {folder / 'gone.txt'}, which does not exist)",
        str(folder / "loop.png"): f"{folder / 'loop.txt'}: symbolic link loop",
    }


def test_a_caption_named_after_the_whole_image_name_gets_a_hint(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "cat", caption=None)
    (tmp_path / "images" / "cat.png.txt").write_text("a cat")
    assert items.list_items(dataset)[1] == [
        (str(tmp_path / "images" / "cat.png"), "no caption file cat.txt (cat.png.txt exists: the caption of cat.png is named cat.txt)")]


def test_captioned_images_of_a_type_not_read_are_named(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "ok")
    # notes.gif has no caption: not a training image; ok.json beside ok.png is no image (fuzz_aa 11: .jfif, .tga... captioned
    # were left out without a word, the list of types named being shorter than the list of types people caption)
    for name in ("anim.gif", "scan.TIFF", "notes.gif", "saved.jfif", "render.tga", "ok.json"):
        (tmp_path / "images" / name).write_bytes(b"GIF89a")
    for stem in ("anim", "scan", "saved", "render"):
        (tmp_path / "images" / f"{stem}.txt").write_text(f"a {stem}")
    found, problems = items.list_items(dataset)
    assert [item.path.name for item in found] == ["ok.png"]
    assert [(os.path.basename(path), reason.split(" (")[0]) for path, reason in problems] == [
        ("anim.gif", ".gif is not a supported image type"), ("render.tga", ".tga is not a supported image type"),
        ("saved.jfif", ".jfif is not a supported image type"), ("scan.TIFF", ".TIFF is not a supported image type")]
    assert problems[2][1].endswith("convert it (a .jfif file is a JPEG: renamed to .jpg it is read)")


def test_videos_of_a_type_not_read_are_named(tmp_path):
    """A .ts, .3gp or .gif in a video folder was left out without a word (an image folder names its unsupported files)."""
    dataset = video_config(tmp_path)
    add_video(tmp_path, "ok")
    for name in ("broadcast.ts", "phone.3GP", "loop.gif", ".hidden.ts", "camera.mxf"):
        (tmp_path / "videos" / name).write_bytes(b"\0" * 64)
    found, problems = items.list_items(dataset)
    assert [item.path.name for item in found] == ["ok.mp4"]
    assert [(os.path.basename(path), reason.split(" (")[0]) for path, reason in problems] == [
        ("broadcast.ts", ".ts is not a supported video type"), ("camera.mxf", ".mxf is not a supported video type"),
        ("loop.gif", ".gif is not a supported video type"), ("phone.3GP", ".3GP is not a supported video type")]


def test_captioned_media_of_the_other_kind_are_named_in_either_folder(tmp_path):
    """fuzz_bc 5: a still image or an animated WebP/APNG captioned in a video folder, a video or an APNG captioned in an image
    folder, vanished without a word; an uncaptioned one (a cover.jpg beside the videos) is no item meant."""
    videos = video_config(tmp_path)
    add_video(tmp_path, "ok")
    for name in ("still.png", "anim.webp", "loop.apng", "cover.jpg", "ok.jpg"):  # (ok.jpg: the video's thumbnail, fuzz_bg 1)
        (tmp_path / "videos" / name).write_bytes(b"\0" * 64)
    for stem in ("still", "anim", "loop"):
        (tmp_path / "videos" / f"{stem}.txt").write_text(f"a {stem}")
    found, problems = items.list_items(videos)
    assert [item.path.name for item in found] == ["ok.mp4"]
    assert [(os.path.basename(path), reason) for path, reason in problems] == [
        ("anim.webp", f"an image in a video_directory, which reads videos ({', '.join(media.VIDEO_EXTENSIONS)}) (an animated one: "
                      "convert it to .mp4); list images in an image_directory"),
        ("loop.apng", f"an image in a video_directory, which reads videos ({', '.join(media.VIDEO_EXTENSIONS)}) (an animated one: "
                      "convert it to .mp4); list images in an image_directory"),
        ("still.png", f"an image in a video_directory, which reads videos ({', '.join(media.VIDEO_EXTENSIONS)}); list images in an "
                      "image_directory")]

    images = image_config(tmp_path)
    add_image(tmp_path, "ok")
    for name in ("clip.mp4", "b.apng", "uncaptioned.mp4"):
        (tmp_path / "images" / name).write_bytes(b"\0" * 64)
    for stem in ("clip", "b"):
        (tmp_path / "images" / f"{stem}.txt").write_text(f"a {stem}")
    found, problems = items.list_items(images)
    assert [item.path.name for item in found] == ["ok.png"]
    assert [(os.path.basename(path), reason.split(";")[0]) for path, reason in problems] == [
        ("b.apng", "an animated PNG is not read as an image"), ("clip.mp4", "a video in an image_directory, which reads images")]
