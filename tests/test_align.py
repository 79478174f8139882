"""Face alignment (vec2face_model/align.py) on a real photo that ships with scikit-image."""

import warnings

import numpy as np
import pytest
from PIL import Image

from vec2face_model import InvalidInputError, NoFaceFoundError, Vec2FacePipeline, align_face
from vec2face_model.align import (
    ARCFACE_TEMPLATE, MTCNN, AlignmentUnavailableError, apply_similarity, detect_landmarks, estimate_similarity,
)

skimage_data = pytest.importorskip("skimage.data", reason="the test photo ships with scikit-image (dev extra)")

# Eye centres of skimage.data.astronaut() (512x512), read off the photo by eye (pupil centres,
# +-1 px): an independent check of the detector's landmarks and of the warp.
ASTRONAUT_EYES = np.array([[204.5, 100.8], [247.5, 103.8]])


@pytest.fixture(scope="module")
def detector():
    try:
        return MTCNN.from_installed()
    except AlignmentUnavailableError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


def test_similarity_estimate_recovers_a_known_transform():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    matrix = estimate_similarity(ARCFACE_TEMPLATE, moved)
    np.testing.assert_allclose(matrix, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    np.testing.assert_allclose(apply_similarity(matrix, ARCFACE_TEMPLATE), moved, atol=1e-9)


def test_detector_finds_the_astronauts_landmarks(detector, astronaut):
    boxes, landmarks = detector.detect(astronaut)
    assert len(boxes) == 1 and boxes[0, 4] > 0.99
    error = np.linalg.norm(landmarks[0, :2] - ASTRONAUT_EYES, axis=1)
    assert error.max() < 3.0, error  # measured: 1.1 and 0.7 px


def test_aligned_crop_puts_the_eyes_on_the_template(detector, astronaut):
    crop = align_face(astronaut, detector=detector)
    assert isinstance(crop, Image.Image) and crop.size == (112, 112) and crop.mode == "RGB"
    # hand-labelled eyes through the same transform the warp used
    matrix = estimate_similarity(detect_landmarks(astronaut, detector=detector), ARCFACE_TEMPLATE)
    hand_error = np.linalg.norm(apply_similarity(matrix, ASTRONAUT_EYES) - ARCFACE_TEMPLATE[:2], axis=1)
    assert hand_error.max() < 4.0, hand_error  # measured: 2.2 and 2.6 px
    # and in the pixels: the detector run again on the 112x112 crop finds the eyes there
    boxes, landmarks = detector.detect(np.asarray(crop))
    assert len(boxes) == 1
    crop_error = np.linalg.norm(landmarks[0, :2] - ARCFACE_TEMPLATE[:2], axis=1)
    assert crop_error.max() < 5.0, crop_error  # measured: 3.0 and 3.8 px


def test_photo_without_a_face_raises_naming_it(detector):
    sky = np.full((200, 240, 3), (120, 160, 220), dtype=np.uint8)
    with pytest.raises(NoFaceFoundError, match="holiday-sky.png") as info:
        align_face(sky, detector=detector, name="holiday-sky.png")
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidInputError)


def test_several_faces_align_the_largest_with_a_warning(detector, astronaut):
    face = Image.fromarray(astronaut).crop((150, 40, 300, 200))
    group = Image.new("RGB", (480, 240), (200, 200, 200))
    group.paste(face, (10, 40))  # 150x160
    group.paste(face.resize((90, 96)), (330, 70))
    with pytest.warns(UserWarning, match="2 faces found"):
        landmarks = detect_landmarks(group, detector=detector)
    assert landmarks[:, 0].max() < 200  # the large copy, on the left


def test_bad_input_is_a_readable_error(detector):
    with pytest.raises(InvalidInputError, match="uint8"):
        align_face(np.zeros((10, 10, 3), dtype=np.float32), detector=detector)


def test_missing_weights_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HSFACE_MTCNN_DIR", str(tmp_path))
    with pytest.raises(AlignmentUnavailableError, match="pip install --no-deps facenet-pytorch"):
        MTCNN.from_installed()


def test_variations_align_photos_by_default(detector, astronaut, monkeypatch):
    import vec2face_model.align as align

    monkeypatch.setattr(align, "_default_detector", lambda: detector)
    pipe = Vec2FacePipeline.from_preset("random-tiny")
    photo = Image.fromarray(astronaut)
    aligned = pipe.variations([photo], images_per_identity=2, seed=0, output_type="np")
    same = pipe.variations([align_face(photo, detector=detector)], images_per_identity=2, seed=0, output_type="np", align=False)
    np.testing.assert_array_equal(aligned.images, same.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NoFaceFoundError):
            pipe.variations([np.zeros((120, 120, 3), np.uint8)], images_per_identity=1)
