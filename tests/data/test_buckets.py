"""Buckets follow musubi-tuner's rules for HunyuanVideo (resolution step 16); resize covers, then centre-crops."""

import re
from pathlib import Path

import numpy as np
import pytest

from musubi_tuner.data.buckets import BucketSelector, area_resize, resize_to_bucket

# §12 of the behaviour reference: all 47 buckets of resolution [960, 544], (width, height).
BUCKETS_960x544 = [
    (352, 1472), (368, 1408), (384, 1360), (400, 1296), (416, 1248), (432, 1200), (448, 1152), (464, 1120),
    (480, 1088), (496, 1040), (512, 1008), (528, 976), (544, 960), (560, 928), (576, 896), (592, 880), (608, 848),
    (624, 832), (640, 816), (656, 784), (672, 768), (688, 752), (704, 736), (720, 720), (736, 704), (752, 688),
    (768, 672), (784, 656), (816, 640), (832, 624), (848, 608), (880, 592), (896, 576), (928, 560), (960, 544),
    (976, 528), (1008, 512), (1040, 496), (1088, 480), (1120, 464), (1152, 448), (1200, 432), (1248, 416),
    (1296, 400), (1360, 384), (1408, 368), (1472, 352),
]


def test_bucket_list_for_960x544_has_the_47_documented_buckets():
    assert list(BucketSelector((960, 544)).buckets) == BUCKETS_960x544


@pytest.mark.parametrize("size, bucket", [
    ((1920, 1080), (960, 544)), ((1080, 1920), (544, 960)), ((1024, 1024), (720, 720)),
    ((640, 480), (832, 624)), ((4000, 3000), (832, 624)), ((960, 544), (960, 544)),
])
def test_images_go_to_the_bucket_with_the_closest_aspect_ratio(size, bucket):
    assert BucketSelector((960, 544)).bucket_for(size) == bucket


def documented_bucket_table():
    """The rows of the bucket table in docs/dataset_config.md: (image size, bucket, bucket with no_upscale)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "dataset_config.md").read_text(encoding="utf-8")
    table = doc[doc.index("| image (W×H) | bucket | with `bucket_no_upscale` |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(tuple(int(v) for v in re.fullmatch(r"(\d+)×(\d+)", cell.strip()).groups())
                          for cell in line.strip("|").split("|")))
    return rows


def test_the_documented_bucket_table_holds():
    rows = documented_bucket_table()
    assert len(rows) >= 10
    plain, no_upscale = BucketSelector((960, 544)), BucketSelector((960, 544), no_upscale=True)
    assert [(size, plain.bucket_for(size), no_upscale.bucket_for(size)) for size, _, _ in rows] == rows


def test_no_upscale_keeps_small_images_at_their_size_floored_to_16():
    selector = BucketSelector((960, 544), no_upscale=True)
    assert selector.bucket_for((640, 480)) == (640, 480)
    assert selector.bucket_for((650, 333)) == (640, 320)
    assert selector.bucket_for((1920, 1080)) == (960, 544)  # larger than the area: buckets as usual


def test_without_bucketing_the_resolution_is_the_only_bucket_and_no_upscale_is_off():
    selector = BucketSelector((960, 544), enable_bucket=False, no_upscale=True)
    assert selector.buckets == ((960, 544),)
    assert selector.bucket_for((300, 300)) == (960, 544)


def test_every_bucket_is_a_multiple_of_16_with_area_at_most_the_resolutions():
    for resolution in [(960, 544), (1280, 720), (512, 512), (64, 64)]:
        for w, h in BucketSelector(resolution).buckets:
            assert w % 16 == 0 and h % 16 == 0 and w * h <= resolution[0] * resolution[1]


def test_resize_covers_the_bucket_then_crops_the_centre():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 140:160] = 255  # a white bar in the middle survives the crop
    out = resize_to_bucket(image, (64, 64))
    assert out.shape == (64, 64, 3)
    assert out[:, 32].min() > 200 and out[:, 0].max() == 0


def test_upscaling_uses_lanczos_and_keeps_the_shape():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert resize_to_bucket(image, (80, 64)).shape == (64, 80, 3)


def test_an_image_already_at_the_bucket_size_is_returned_unchanged():
    image = np.zeros((64, 80, 3), np.uint8)
    assert resize_to_bucket(image, (80, 64)) is image


def test_area_resize_by_an_integer_factor_is_the_block_mean():
    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    expected = np.floor(image.reshape(30, 2, 45, 2, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)  # halves up
    assert np.array_equal(area_resize(image, (45, 30)), expected.astype(np.uint8))


@pytest.mark.parametrize("size, out", [
    ((1000, 600), (933, 560)), ((1333, 777), (500, 291)), ((1280, 720), (967, 544)),  # fractional factors
    ((1024, 1024), (512, 512)), ((90, 60), (30, 20)), ((96, 64), (32, 16)),  # whole factors: 2, 3, 3 x 4
])
def test_area_resize_equals_opencvs_inter_area_pixel_for_pixel(size, out):
    """What musubi-tuner computes (cv2.INTER_AREA); before, 1 apart on 12.5% of values at factor 2 and on up to
    1e-4 of them at fractional factors."""
    cv2 = pytest.importorskip("cv2")
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).normal(0, 20, (h, w, 3))
    image = np.clip(np.stack([x * 255 / w, y * 255 / h, (x + y) % 256], axis=-1) + noise, 0, 255).astype(np.uint8)
    assert np.array_equal(area_resize(image, out), cv2.resize(image, out, interpolation=cv2.INTER_AREA))


def test_area_resize_weights_partly_covered_pixels_by_their_overlap():
    row = np.array([[0, 90, 180]], np.uint8)[..., None].repeat(3, axis=2)  # (1, 3, 3)
    # 3 -> 2 pixels: each output covers 1.5 inputs: (0 + 0.5*90)/1.5 = 30, (0.5*90 + 180)/1.5 = 150
    assert area_resize(row, (2, 1))[0, :, 0].tolist() == [30, 150]


def test_area_resize_keeps_a_flat_image_flat():
    assert np.all(area_resize(np.full((37, 53, 3), 77, np.uint8), (20, 11)) == 77)


@pytest.mark.parametrize("shape, bucket", [((100, 2), (96, 64)), ((3, 400), (64, 48)), ((1, 90), (32, 32))])
def test_an_extreme_aspect_ratio_scales_only_the_part_that_stays_with_the_same_pixels(shape, bucket):
    """A 1 x 80000 image was scaled whole to cover 960 x 544 (76.8 million rows) before the crop: minutes, then a
    MemoryError. The kept part alone, from the same source region, gives the whole-then-crop pixels (musubi-tuner's
    order)."""
    from PIL import Image

    image = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
    height, width = shape
    scale = max(bucket[0] / width, bucket[1] / height)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    assert new_w * new_h > 16 * bucket[0] * bucket[1]  # the case the limit is for
    whole = np.array(Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS))
    left, top = (new_w - bucket[0]) // 2, (new_h - bucket[1]) // 2
    want = whole[top:top + bucket[1], left:left + bucket[0]]
    got = resize_to_bucket(image, bucket)
    assert got.shape == want.shape
    assert np.array_equal(got, want)
