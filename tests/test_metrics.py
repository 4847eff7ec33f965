"""Confusion matrices, mIoU and trimap bands on hand-made cases."""
import math

import numpy as np
import pytest
import torch

from trainer.metrics import boundary_distance, confusion_matrix, miou, trimap_confusions, trimap_miou


def boundary_band(gt, width: int):
    """Pixels within ``width`` px (Chebyshev) of a ground-truth label boundary.

    A pixel is in the band when its (2·width+1)² window contains two different
    labels (255 counts as a label, so the band also surrounds VOC's void
    outlines).  Returns a bool array/tensor of gt's shape and kind (numpy/torch).
    """
    if width < 1:
        raise ValueError("width must be >= 1")
    band = boundary_distance(gt, width) <= width
    if isinstance(gt, torch.Tensor):
        return band.to(gt.device)
    return band.cpu().numpy()


def test_confusion_matrix_hand_case_and_ignore():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    c = confusion_matrix(pred, gt, 3)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(c, expected)
    assert c.dtype == np.int64
    # torch input, accumulation
    c2 = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 3)
    np.testing.assert_array_equal(c + c2, 2 * expected)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[5]]), np.array([[0]]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(pred[:, :2], gt, 3)


def test_miou_standard_definition():
    conf = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    m, per = miou(conf)
    assert per[0] == pytest.approx(1 / 3)   # tp 1, gt 2, pred 2
    assert per[1] == pytest.approx(2 / 3)   # tp 2, gt 2, pred 3
    assert per[2] == 0.0                     # present in gt, never right
    assert math.isnan(per[3])                # absent from gt and pred: excluded
    assert m == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    m0, per0 = miou(np.zeros((2, 2)))
    assert math.isnan(m0) and all(math.isnan(v) for v in per0)


def test_boundary_band_hand_case():
    gt = np.zeros((7, 8), dtype=np.int64)
    gt[:, 4:] = 1  # vertical boundary between columns 3 and 4
    b1 = boundary_band(gt, 1)
    assert b1.dtype == bool and b1.shape == gt.shape
    assert b1[:, 3].all() and b1[:, 4].all() and not b1[:, [0, 1, 2, 5, 6, 7]].any()
    b2 = boundary_band(gt, 2)
    assert b2[:, 2:6].all() and not b2[:, [0, 1, 6, 7]].any()
    # Chebyshev distance: a single-pixel object at (3, 3).
    gt2 = np.zeros((9, 9), dtype=np.int64)
    gt2[4, 4] = 2
    d = boundary_distance(gt2, 5).numpy()
    assert d[4, 4] == 1 and d[3, 3] == 1 and d[2, 2] == 2 and d[0, 0] == 4 and d[0, 8] == 4
    # constant image: empty band; torch input keeps torch output
    t = boundary_band(torch.zeros(2, 5, 5, dtype=torch.long), 3)
    assert isinstance(t, torch.Tensor) and not t.any()


def test_void_counts_as_a_label_for_the_band():
    gt = np.zeros((5, 9), dtype=np.int64)
    gt[:, 4] = 255
    b = boundary_band(gt, 1)
    assert b[:, 3:6].all() and not b[:, [0, 1, 2, 6, 7, 8]].any()


def test_boundary_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    gt = np.zeros((20, 23), dtype=np.int64)
    gt[5:12, 3:15] = 1
    gt[14:, 10:] = 2
    gt[rng.random(gt.shape) < 0.01] = 255
    d = boundary_distance(gt, 8).numpy()
    H, W = gt.shape
    for i in range(H):
        for j in range(W):
            want = 9
            for w in range(1, 9):
                win = gt[max(0, i - w):i + w + 1, max(0, j - w):j + w + 1]
                if len(np.unique(win)) > 1:
                    want = w
                    break
            assert d[i, j] == want, (i, j)


def test_trimap_confusions_match_masked_confusions():
    rng = np.random.default_rng(1)
    gt = np.zeros((2, 30, 40), dtype=np.int64)
    gt[0, 8:20, 5:25] = 1
    gt[1, 3:, 20:] = 2
    gt[1, 10:12, :] = 255
    pred = gt.copy()
    pred[pred == 255] = 0
    flip = rng.random(gt.shape) < 0.2
    pred[flip] = rng.integers(0, 3, flip.sum())
    widths = [1, 2, 5, 40]
    confs = trimap_confusions(pred, gt, 3, widths)
    assert confs.shape == (4, 3, 3) and confs.dtype == np.int64
    for t, w in enumerate(widths):
        band = boundary_band(gt, w)
        expected = confusion_matrix(pred[band], gt[band], 3)
        np.testing.assert_array_equal(confs[t], expected)
    # widest band covers every evaluated pixel here
    np.testing.assert_array_equal(confs[-1], confusion_matrix(pred, gt, 3))
    vals = trimap_miou(confs)
    assert len(vals) == 4 and all(0 <= v <= 1 for v in vals)
    # accumulation over images equals the batched call
    acc = trimap_confusions(pred[0], gt[0], 3, widths) + trimap_confusions(pred[1], gt[1], 3, widths)
    np.testing.assert_array_equal(acc, confs)


def test_trimap_on_voc_sized_masks():
    """All 40 widths of paper Fig. 6 from one call on a VOC-sized mask equal the masked
    confusions (its speed is not a test's business: benchmarks/)."""
    gt = np.zeros((375, 500), dtype=np.int64)
    gt[100:300, 150:400] = 5
    pred = np.roll(gt, 3, axis=1)
    confs = trimap_confusions(pred, gt, 21, range(1, 41))
    assert confs.shape == (40, 21, 21)
    for w in (1, 3, 4, 40):
        band = boundary_band(gt, w)
        np.testing.assert_array_equal(confs[w - 1], confusion_matrix(pred[band], gt[band], 21))
    # the shift by 3 columns errs on 3 × 200 pixels each side, all within 3 pixels of the boundary
    assert (confs[2:, 5, 0] == 600).all() and (confs[2:, 0, 5] == 600).all() and confs[0, 5, 0] < 600


def test_where_errors_are_splits_finding_objects_from_naming_them():
    from experiments.recipe_sweep import where_errors_are

    # rows: truth (0 background), columns: prediction
    conf = [[90, 10, 0],
            [0, 30, 10],  # every object pixel found; a quarter of class 1's called class 2
            [0, 0, 60]]
    out = where_errors_are(conf)
    # background vs objects: bg IoU 90/100, fg IoU 100/110
    assert out["fg_miou"] == round((0.9 + 100 / 110) / 2, 4)
    assert out["class_acc"] == 0.9  # 90 of the 100 object pixels found get their class
