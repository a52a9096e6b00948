"""finetune/scoring/interactive.py: the CVPR 2025 interactive 3D challenge's click simulation and
scores, against brute-force references and a fake correction engine."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from scipy.integrate import cumulative_trapezoid

from samtune.finetune.scoring.interactive import CLICKS, challenge_box, click_auc, error_click, simulate, summarise
from samtune.finetune.scoring.tables import describe_interactive


def brute_force_click(pred: np.ndarray, target: np.ndarray):
    """The challenge's click computed the slow way: 26-connected error components by flood fill,
    the largest (lowest label among equals, labels in C order of first voxel), and for each of its
    voxels the distance to the nearest voxel outside it, the volume's outside included."""
    error = pred != target
    shape = error.shape
    label = np.zeros(shape, int)
    sizes = [0]
    for start in zip(*np.nonzero(error)):
        if label[start]:
            continue
        sizes.append(0)
        stack = [start]
        label[start] = len(sizes) - 1
        while stack:
            v = stack.pop()
            sizes[-1] += 1
            for d in itertools.product((-1, 0, 1), repeat=3):
                n = tuple(a + b for a, b in zip(v, d))
                if all(0 <= c < s for c, s in zip(n, shape)) and error[n] and not label[n]:
                    label[n] = len(sizes) - 1
                    stack.append(n)
    largest = int(np.argmax(sizes))
    inside = label == largest
    grid = np.stack(np.meshgrid(*[np.arange(-1, s + 1) for s in shape], indexing="ij"), -1)
    padded = np.pad(inside, 1)
    outside = grid[~padded]  # every voxel not in the component, one layer beyond the volume included
    voxels = np.argwhere(inside)
    distance = np.array([np.sqrt(((outside - v) ** 2).sum(1)).min() for v in voxels])
    ties = voxels[np.isclose(distance, distance.max())]
    np.random.seed(42)  # the challenge's sample_coord
    z, y, x = (int(c) for c in ties[np.random.choice(len(ties))])
    return (z, y, x), bool(target[z, y, x])


@pytest.mark.parametrize("seed", range(6))
def test_the_click_is_at_the_centre_of_the_largest_error_component(seed):
    rng = np.random.default_rng(seed)
    target = np.zeros((7, 8, 9), bool)
    target[1:6, 2:7, 1:8] = True
    pred = target.copy()
    pred[rng.random(target.shape) < 0.25] ^= True  # scattered errors of both kinds
    z0, y0, x0 = rng.integers(0, 3, 3)
    pred[z0 : z0 + 4, y0 : y0 + 3, x0 : x0 + 5] = ~target[z0 : z0 + 4, y0 : y0 + 3, x0 : x0 + 5]  # one larger error
    assert error_click(pred, target) == brute_force_click(pred, target)


def test_a_missed_region_gets_a_foreground_click_and_a_false_alarm_a_background_click():
    target = np.zeros((12, 14, 14), bool)
    target[1:9, 1:9, 1:9] = True
    pred = target.copy()
    pred[2:7, 2:7, 2:7] = False  # 125 missed voxels around (4, 4, 4)
    pred[0:3, 10:13, 10:13] = True  # 27 false-alarm voxels around (1, 11, 11), at the volume's edge
    assert error_click(pred, target) == ((4, 4, 4), True)
    pred[2:7, 2:7, 2:7] = True
    assert error_click(pred, target) == ((1, 11, 11), False)
    assert error_click(target, target) is None


def test_the_box_is_the_challenges():
    rng = np.random.default_rng(0)
    target = np.zeros((10, 20, 30), bool)
    target[2:9, 4:15, 6:25] = rng.random((7, 11, 19)) < 0.3
    z_min, z_max, z_mid, box = challenge_box(target)
    z, y, x = np.where(target)  # get_boxes.py's mask3D_to_bbox
    assert (z_min, z_max, z_mid) == (z.min(), z.max(), z[len(z) // 2])
    ys, xs = np.where(target[z_mid])
    assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel edges: max + 1


def test_auc_is_the_challenges_trapezoid_over_the_clicks():
    curve = [0.1, 0.6, 0.7, 0.8, 0.9, 1.0]  # step 0 left out: (0.65 + 0.75 + 0.85 + 0.95)
    assert click_auc(curve) == pytest.approx(3.2)
    assert click_auc(curve) == pytest.approx(cumulative_trapezoid(np.array(curve[-CLICKS:]), np.arange(CLICKS))[-1])
    assert click_auc([0.0] + [1.0] * CLICKS) == 4.0


class SphereCorrector:
    """A fake engine: the current mask plus a ball of radius 2 around each foreground click, minus
    one around each background click; records what it was given."""

    def __init__(self):
        self.calls = []

    def correct(self, mask, class_index, foreground, background, key=None):
        self.calls.append((class_index, list(foreground), list(background)))
        grid = np.indices(mask.shape).transpose(1, 2, 3, 0)
        out = mask.copy()
        for clicks, value in ((foreground, True), (background, False)):
            for c in clicks:
                out[((grid - np.array(c)) ** 2).sum(-1) <= 4] = value
        return out


def test_the_loop_clicks_into_the_errors_and_scores_every_step():
    target = np.zeros((12, 16, 16), bool)
    target[2:10, 3:13, 3:13] = True
    first = np.zeros_like(target)
    first[2:10, 3:13, 3:8] = True  # half of the object
    first[0:2, 13:16, 13:16] = True  # and a small false alarm
    fake = SphereCorrector()
    result = simulate(fake, first, target, 3, (2.0, 1.0, 1.0))
    assert len(result["dice"]) == len(result["nsd"]) == CLICKS + 1
    assert result["dice"][0] == pytest.approx(2 * 400 / (400 + 800 + 18))
    assert all(b >= a for a, b in zip(result["dice"], result["dice"][1:]))  # a ball in the missed half only adds true voxels
    assert len(fake.calls) == CLICKS and all(index == 3 for index, _, _ in fake.calls)
    for n, (_, fg, bg) in enumerate(fake.calls, 1):  # every click so far, each in the error of its time
        assert len(fg) + len(bg) == n
    assert [c[3] for c in result["clicks"]] == ["fg"] * CLICKS  # the missed half stays the largest error
    assert all(target[tuple(c[:3])] for c in result["clicks"])
    assert result["dice_auc"] == click_auc(result["dice"]) and result["nsd_auc"] == click_auc(result["nsd"])


def test_a_perfect_mask_gets_no_click():
    target = np.zeros((5, 8, 8), bool)
    target[1:4, 2:6, 2:6] = True
    fake = SphereCorrector()
    result = simulate(fake, target, target, None, (1.0, 1.0, 1.0))
    assert fake.calls == [] and result["clicks"] == []
    assert result["dice"] == [1.0] * (CLICKS + 1) and result["dice_auc"] == 4.0


def test_summary_means_over_cases_then_classes():
    def case(d0, d, n):
        dice, nsd = [d0] + [d] * CLICKS, [n] * (CLICKS + 1)
        return {"case": "c", "dice": dice, "nsd": nsd, "dice_auc": click_auc(dice), "nsd_auc": click_auc(nsd), "clicks": []}

    out = summarise({"liver": [case(0.5, 0.9, 0.4), case(0.3, 0.7, 0.2)], "spleen": [case(0.1, 0.5, 1.0)], "kidney": []})
    liver = out["per_class"]["liver"]
    assert liver["dice"] == pytest.approx([0.4] + [0.8] * CLICKS) and liver["final_nsd"] == pytest.approx(0.3)
    assert liver["dice_auc"] == pytest.approx(3.2) and liver["cases"] == 2
    assert out["per_class"]["kidney"]["cases"] == 0 and math.isnan(out["per_class"]["kidney"]["final_dice"])
    assert out["mean"]["final_dice"] == pytest.approx((0.8 + 0.5) / 2)  # the class without cases is left out
    assert out["mean"]["dice"][0] == pytest.approx((0.4 + 0.1) / 2) and out["mean"]["dice_auc"] == pytest.approx((3.2 + 2.0) / 2)
    part = {**out, "first_prompt": "box", "propagation": "box", "clicks": CLICKS, "nsd_tolerance_mm": 2.0, "seconds": 1.0}
    table = describe_interactive(part)
    assert "INTERACTIVE validation" in table and "click 5" in table
    assert [line.split()[0] for line in table.splitlines() if line.split()[:1] in (["liver"], ["spleen"], ["mean"], ["kidney"])] == ["liver", "spleen", "mean"]


def _report_rows(html: str) -> list[list[str]]:
    """The rows (cell texts) of the report's interactive table."""
    table = html.split('<table class="interactive">')[1].split("</table>")[0]
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in table.split("<tr")[1:]]


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_writes_the_interactive_block_table_and_report(both_task_run, tmp_path, capsys):
    """`samtune evaluate` of a task-both checkpoint with eval.volume_mode=interactive: step 0 is the
    automatic result, then the real correction engine; metrics.json, the printed table and the
    report agree."""
    from samtune.finetune.cli import main
    from samtune.finetune.report.page import num

    recipe, run = both_task_run
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out), "eval.volume_mode=interactive"]) == 0
    part = json.loads(out.read_text())["interactive"]
    assert part["first_prompt"] == "automatic" and part["clicks"] == CLICKS and part["nsd_tolerance_mm"] == 2.0
    assert "CVPR25_iter_eval.py" in part["protocol"]["source"] and len(part["protocol"]["differs_from_challenge"]) >= 5
    scored = {name: c for name, c in part["per_class"].items() if c["cases"]}
    assert scored and part["slices_encoded"] > 0
    for c in scored.values():
        assert len(c["dice"]) == len(c["nsd"]) == CLICKS + 1 and all(0.0 <= v <= 1.0 for v in c["dice"] + c["nsd"])
        assert 0.0 <= c["dice_auc"] <= 4.0 and c["final_dice"] == c["dice"][-1]
        for case in c["per_case"]:
            assert len(case["clicks"]) <= CLICKS and all(kind in ("fg", "bg") for *_, kind in case["clicks"])
            assert case["dice_auc"] == pytest.approx(click_auc(case["dice"]))
    assert part["mean"]["final_dice"] == pytest.approx(np.mean([c["final_dice"] for c in scored.values()]))
    printed = capsys.readouterr().out
    assert "INTERACTIVE validation" in printed and "the automatic result" in printed
    rows = _report_rows((out.parent / "report.html").read_text())
    assert rows[0][:3] == ["class", "metric", "step 0 (automatic)"]
    mean_dice = next(r for r in rows if r[0] == "mean")
    assert mean_dice[2:] == [num(v) for v in part["mean"]["dice"]] + [num(part["mean"]["dice_auc"]), num(part["mean"]["final_dice"]), ""]
    assert "interactive" in (out.parent / "report.html").read_text().split("Per-class results")[0]  # its protocol is shown


@pytest.mark.usefixtures("one_torch_thread")
def test_a_promptable_checkpoint_starts_from_the_box(phantom_template, make_run, tmp_path):
    from samtune.datasets.source import LabelSpace
    from samtune.finetune.cli import main

    space = LabelSpace([1, 2, 3, 4], ["liver", "spleen", "kidney_right", "kidney_left"])
    run = make_run(tmp_path, {"kind": "nifti", "root": str(phantom_template), "val_fraction": 0.34}, space, task="promptable", tokens=0)
    out = tmp_path / "metrics.json"
    assert main(["-q", "evaluate", str(tmp_path / "recipe.yaml"), "--checkpoint", str(run / "checkpoints" / "best"), "--out", str(out),
                 "eval.volume_mode=interactive", "eval.propagation=box"]) == 0  # fmt: skip
    part = json.loads(out.read_text())["interactive"]
    assert part["first_prompt"] == "box" and part["propagation"] == "box" and "z_mid" in part["protocol"]["step_0"]
    assert sum(c["cases"] for c in part["per_class"].values()) >= 1
