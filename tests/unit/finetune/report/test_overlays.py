"""finetune/report/overlays.py: the pictures TensorBoard shows of fixed validation samples."""

from __future__ import annotations

import numpy as np

from samtune.finetune.report.overlays import draw_prompted


def test_prediction_outline_box_and_points_are_drawn_where_they_are():
    image = np.full((40, 60), 100, np.uint8)
    pred = np.zeros((40, 60), bool)
    pred[10:20, 10:30] = True
    target = np.zeros((40, 60), bool)
    target[12:22, 12:32] = True
    picture = draw_prompted(image, pred, target, box_xyxy=(5, 5, 50, 35), points=np.array([[45.0, 8.0]]), point_labels=np.array([1]))
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    inside = picture[15, 20]
    assert inside[1] > inside[0] and inside[1] > 100  # prediction tinted green
    assert tuple(picture[12, 25]) == (230, 30, 30)  # ground-truth outline in red (top edge)
    assert tuple(picture[5, 40]) == (250, 220, 0) and tuple(picture[35, 40]) == (250, 220, 0)  # the box's edges
    assert tuple(picture[8, 45]) == (40, 220, 60)  # a positive click
    assert tuple(picture[30, 55]) == (100, 100, 100)  # elsewhere the image itself
