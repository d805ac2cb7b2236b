import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vitsam.data import corruptions as C
from vitsam.eval import metrics as M
from vitsam.eval import robustness as R
from vitsam.eval import shifts as S


class TableModel(nn.Module):
    """Returns row ``id`` of a fixed logits table, where ``id`` is the image's top-left pixel value.

    With mean 0 and std 1 the preprocessed pixel is id / 255, so the id survives preprocessing.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.round(x[:, 0, 0, 0] * 255).long()
        return self.table[ids] * self.scale


def id_images(ids, side=8, chans=3) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, chans, side, side).contiguous()


ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- metrics

def test_topk_hand_case():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # order 3,1,5,2,0,4
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # order 0,1,2,3,4,5
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # order 5,4,3,2,1,0
    targets = torch.tensor([1, 0, 0])
    acc = M.topk_accuracy(logits, targets, ks=(1, 2, 5, 6))
    assert acc == {1: 1 / 3, 2: 2 / 3, 5: 2 / 3, 6: 1.0}
    with pytest.raises(ValueError, match="class indices"):
        M.topk_accuracy(logits, torch.tensor([0, 0, 6]))


def test_ece_hand_case():
    # Confidences 0.9 (right), 0.9 (wrong), 0.55 (right), 0.58 (wrong) with 10 bins:
    # bin (0.8, 0.9]: acc 1/2, conf 0.9 -> |0.5 - 0.9| * 2/4; bin (0.5, 0.6]: acc 1/2, conf 0.565 -> 0.065 * 2/4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.45, 0.55], [0.58, 0.42]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 1])
    ece = M.expected_calibration_error(probs, targets, n_bins=10)
    assert math.isclose(ece, 0.4 * 0.5 + 0.065 * 0.5, abs_tol=1e-12)
    # One bin: |accuracy - mean confidence| over everything.
    assert math.isclose(M.expected_calibration_error(probs, targets, n_bins=1), abs(0.5 - 0.7325), abs_tol=1e-12)


def test_evaluate_matches_direct_computation_and_restores_mode():
    torch.manual_seed(0)
    table = torch.randn(6, 7)
    model = TableModel(table).train()
    ids, y = [0, 1, 2, 3, 4, 5], torch.tensor([0, 3, 3, 6, 1, 2])
    batches = list(M.uint8_batches(id_images(ids), y, 4, ZERO, ONE))
    res = M.evaluate(model, batches)
    assert model.training
    assert res["n"] == 6
    assert math.isclose(res["top1"], float((table.argmax(1) == y).float().mean()))
    top5 = table.topk(5, 1).indices
    assert math.isclose(res["top5"], float((top5 == y[:, None]).any(1).float().mean()))
    assert math.isclose(res["nll"], float(nn.functional.cross_entropy(table.double(), y)), rel_tol=1e-9)
    assert math.isclose(res["ece"], M.expected_calibration_error(table.double().softmax(1), y), abs_tol=1e-12)


def test_preprocess_formula_and_resize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    out = M.preprocess(x, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    flat = torch.full((1, 3, 8, 8), 51, dtype=torch.uint8)
    assert torch.allclose(M.preprocess(flat, ZERO, ONE, 12), torch.full((1, 3, 12, 12), 0.2), atol=1e-6)
    with pytest.raises(ValueError, match="one value per channel"):
        M.preprocess(x, [0.5], [0.5])


# ---------------------------------------------------------------- mCE

def test_mce_hand_computation():
    run = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.3, 2: 0.5}, "saturate": {1: 0.1, 2: 0.1}}
    base = {"fog": {1: 0.4, 2: 0.6}, "snow": {"1": 0.5, "2": 0.7}}
    res = R.mce(run, base, clean_err=0.1, baseline_clean_err=0.2)
    assert math.isclose(res["CE"]["fog"], 0.6 / 1.0) and math.isclose(res["CE"]["snow"], 0.8 / 1.2)
    assert math.isclose(res["mCE"], (0.6 + 0.8 / 1.2) / 2)
    # relative: fog (0.1 + 0.3) / (0.2 + 0.4) ; snow (0.2 + 0.4) / (0.3 + 0.5)
    assert math.isclose(res["relative_CE"]["fog"], 0.4 / 0.6)
    assert math.isclose(res["relative_mCE"], (0.4 / 0.6 + 0.6 / 0.8) / 2)
    assert res["skipped"] == ["saturate"] and res["missing"] == []
    assert R.mce(run, base)["relative_mCE"] is None


def test_mce_against_alexnet_averages():
    errs = [0.5, 0.6, 0.7, 0.8, 0.9]
    run = {"fog": dict(zip(range(1, 6), errs)), "contrast": dict(zip(range(1, 6), errs))}
    res = R.mce(run, "alexnet", clean_err=0.3)
    assert math.isclose(res["CE"]["fog"], 0.7 / 0.819324)
    assert math.isclose(res["relative_CE"]["contrast"], (0.7 - 0.3) / (0.853204 - R.ALEXNET_CLEAN_ERROR))
    assert len(res["missing"]) == 13 and res["baseline"] == "alexnet"
    with pytest.raises(ValueError, match="percent"):
        R.mce({"fog": {1: 50.0}}, {"fog": {1: 0.5}})
    with pytest.raises(ValueError, match="same severities"):
        R.mce({"fog": {1: 0.5, 2: 0.5}}, {"fog": {1: 0.5, 3: 0.5}})
    with pytest.raises(ValueError, match="all 5 severities"):
        R.mce({"fog": {1: 0.5}}, "alexnet")


# ---------------------------------------------------------------- corruption evaluation

def test_evaluate_corruptions_end_to_end(tmp_path):
    # Near the decision threshold (127.5), so brightening flips some predictions.
    imgs = np.stack([np.full((3, 32, 32), v, np.uint8) for v in (110, 140, 124, 131)])
    labels = np.array([0, 1, 0, 1])
    out = C.build_corruption_set(imgs, labels, tmp_path / "set", params="cifar-c",
                                 corruptions=["brightness", "contrast", "spatter"], severities=(1, 5),
                                 workers=0, progress=False)
    # A "brightness detector": class 1 iff the image is brighter than mid-grey.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = 1.0 / (3 * 32 * 32)
        model[1].bias.copy_(torch.tensor([0.5, 0.0]))
    res = R.evaluate_corruptions(model, out, ZERO, ONE, 32, batch_size=3, progress=False)
    for name, s, images, labs in C.iter_corruption_set(out):
        pred = (images.float().mean(dim=(1, 2, 3)) / 255 > 0.5).long()
        assert math.isclose(res["accuracy"][name][str(s)], float((pred == labs).float().mean()))
    assert res["accuracy"]["brightness"]["5"] < 1.0  # not a trivial all-correct case
    assert res["clean"]["top1"] == 1.0 and res["params"] == "cifar-c"
    mca = np.mean([np.mean(list(res["accuracy"][c].values())) for c in ("brightness", "contrast")])
    assert math.isclose(res["mean_corruption_accuracy"], mca)  # spatter is held out: not in the mean
    assert math.isclose(res["corruption_error"]["spatter"], 1 - np.mean(list(res["accuracy"]["spatter"].values())))
    json.dumps(res)
    # A hand-made baseline run: 60% error on every part (two severities), 20% clean error.
    base = {"params": "cifar-c", "accuracy": {c: {s: 0.4 for s in v} for c, v in res["accuracy"].items()},
            "clean": {"top1": 0.8}}
    m = R.mce_from_results(res, base)
    errs = {c: sum(1 - a for a in res["accuracy"][c].values()) for c in ("brightness", "contrast")}
    assert m["corruptions"] == ["brightness", "contrast"]
    assert math.isclose(m["mCE"], np.mean([e / 1.2 for e in errs.values()]))
    assert math.isclose(m["relative_mCE"], np.mean([(e - 2 * 0.0) / (1.2 - 2 * 0.2) for e in errs.values()]))
    table = R.corruption_errors_table([("a", res), ("b", res)], baseline=base)
    assert table.splitlines()[1].split()[3] == f"{100 * m['mCE']:.1f}"
    assert "contr" in table and "brit" in table
    assert R.heatmap([("a", res), ("b", res)], tmp_path / "h.png").stat().st_size > 0
    assert "mean corruption accuracy" in R.severity_table(res)


# ---------------------------------------------------------------- shifts

def class_mapped_case():
    # Training classes 0..3; source classes "a" -> cat (1), "b" -> 3. Unmapped classes 0 and 2
    # carry the largest logits, so unrestricted argmax is always wrong.
    table = torch.tensor([[5.0, 2.0, 4.0, 1.0],   # id 0, class a: restricted picks 1 (right)
                          [5.0, 1.0, 4.0, 2.0],   # id 1, class a: restricted picks 3 (wrong)
                          [0.0, 1.0, 5.0, 3.0],   # id 2, class b: restricted picks 3 (right)
                          [9.0, 0.5, 0.0, 0.0]])  # id 3, class b: restricted picks 1 (wrong)
    return table, torch.tensor([0, 0, 1, 1]), {"a": "cat", "b": 3}, ["dog", "cat", "owl", "fox"]


def test_class_mapped_restricts_logits():
    table, labels, mapping, train = class_mapped_case()
    model = TableModel(table)
    kw = {"mean": ZERO, "std": ONE, "img_size": 8, "source_classes": ["a", "b"], "progress": False, "batch_size": 3}
    res = S.evaluate_class_mapped(model, (id_images([0, 1, 2, 3]), labels), mapping, train, **kw)
    assert res["top1"] == 0.5 and res["n_classes_scored"] == 2 and res["top5"] == 1.0
    sub = table[:, [1, 3]].double().softmax(1)
    ref_ece = M.expected_calibration_error(sub, torch.tensor([0, 0, 1, 1]))
    assert math.isclose(res["ece"], ref_ece, abs_tol=1e-12)
    full = S.evaluate_class_mapped(model, (id_images([0, 1, 2, 3]), labels), mapping, train, restrict=False, **kw)
    assert full["top1"] == 0.0
    with pytest.raises(ValueError, match="not in the mapping"):
        S.evaluate_class_mapped(model, (id_images([0, 1, 2, 3]), labels), {"a": 1}, train, **kw)
    with pytest.raises(ValueError, match="not a training class"):
        S.evaluate_class_mapped(model, (id_images([0, 1, 2, 3]), labels), {"a": "cow", "b": 3}, train, **kw)


def write_folder(root, classes_to_ids, ext=".png"):
    for cls, ids in classes_to_ids.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in ids:
            Image.fromarray(np.full((10, 12, 3), i, np.uint8)).save(root / cls / f"img{i:03d}{ext}")


def test_class_mapped_from_folder_and_json(tmp_path):
    table, _, mapping, train = class_mapped_case()
    write_folder(tmp_path / "r", {"a": [0, 1], "b": [2, 3]})
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    res = S.evaluate_class_mapped(TableModel(table), tmp_path / "r", tmp_path / "map.json", train,
                                  mean=ZERO, std=ONE, img_size=8, progress=False, workers=2)
    assert res["top1"] == 0.5 and res["n"] == 4
    (tmp_path / "r" / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        S.evaluate_class_mapped(TableModel(table), tmp_path / "r", mapping, train, mean=ZERO, std=ONE,
                                img_size=8, progress=False)


def test_decode_resizes_short_side_and_centre_crops(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # bright centre band, half the width
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = S.decode_for_eval(tmp_path / "x.png", 10)  # 20x40 -> 10x20 -> centre 10x10: all bright
    assert out.shape == (3, 10, 10) and out.min() > 200
    grey = S.decode_for_eval(tmp_path / "x.png", 10, in_chans=1, crop_pct=0.5)  # 40x80 -> centre 10x10
    assert grey.shape == (1, 10, 10) and grey.min() > 200


def test_real_labels_sets_and_skips(tmp_path):
    table = torch.tensor([[1.0, 5.0, 3.0, 4.0, 0.0, 2.0],   # top1 1, top5 {1,3,2,5,0}
                          [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],   # top1 0, top5 {0..4}
                          [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],   # top1 5
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    model = TableModel(table)
    sets = [[3, 1], [5], [], [2, 0]]  # right at top1; wrong (top5 too); skipped; right
    kw = {"mean": ZERO, "std": ONE, "img_size": 8, "progress": False, "batch_size": 2}
    res = S.evaluate_real_labels(model, id_images([0, 1, 2, 3]), sets, **kw)
    assert res["n"] == 3 and res["n_skipped"] == 1
    assert math.isclose(res["top1"], 2 / 3) and math.isclose(res["top5"], 2 / 3) and res["ece"] is None
    write_folder(tmp_path / "val", {"x": [0, 2], "y": [1, 3]}, ext=".png")
    by_stem = {"img000": [3, 1], "img001": [5], "img002": [], "img003": [2, 0]}
    res_dir = S.evaluate_real_labels(model, tmp_path / "val", by_stem, **kw)
    assert (res_dir["top1"], res_dir["top5"], res_dir["n"]) == (res["top1"], res["top5"], 3)
    (tmp_path / "real.json").write_text(json.dumps(sets))  # list form: file-name order img000..img003
    assert S.evaluate_real_labels(model, tmp_path / "val", tmp_path / "real.json", **kw)["top1"] == res["top1"]
    with pytest.raises(ValueError, match="no entry"):
        S.evaluate_real_labels(model, tmp_path / "val", {"img000": [1]}, **kw)


def test_second_test_folder_with_index_names(tmp_path):
    table = torch.eye(4)
    write_folder(tmp_path / "v2", {"0": [0], "1": [1], "2": [3], "3": [2]})  # two images in the wrong class
    res = S.evaluate_folder(TableModel(table), tmp_path / "v2", mean=ZERO, std=ONE, img_size=8, progress=False)
    assert res["top1"] == 0.5 and res["n"] == 4 and res["kind"] == "test_folder"
    write_folder(tmp_path / "named", {"dog": [0], "cat": [1]})
    res = S.evaluate_folder(TableModel(table), tmp_path / "named", ["dog", "cat", "owl", "fox"], mean=ZERO,
                            std=ONE, img_size=8, progress=False)
    assert res["top1"] == 1.0
    with pytest.raises(ValueError, match="neither training class names nor indices"):
        S.evaluate_folder(TableModel(table), tmp_path / "named", ["owl"], mean=ZERO, std=ONE, img_size=8,
                          progress=False)


def test_corruption_folder_tree(tmp_path):
    table = torch.eye(4)
    # ImageNet-C layout root/<corruption>/<severity>/<class>/<image>; ids double as predictions.
    write_folder(tmp_path / "c" / "fog" / "1", {"0": [0], "1": [1]})      # both right
    write_folder(tmp_path / "c" / "fog" / "2", {"0": [0], "1": [2]})      # one wrong
    write_folder(tmp_path / "c" / "speckle_noise" / "1", {"0": [3], "1": [1]})
    write_folder(tmp_path / "clean", {"0": [0], "1": [1]})
    res = R.evaluate_corruption_folders(TableModel(table), tmp_path / "c", mean=ZERO, std=ONE, img_size=8,
                                        clean_dir=tmp_path / "clean", progress=False)
    assert res["accuracy"] == {"fog": {"1": 1.0, "2": 0.5}, "speckle_noise": {"1": 0.5}}
    assert res["mean_corruption_accuracy"] == 0.75 and res["clean"]["top1"] == 1.0
    assert res["params"] == "folders" and not res["complete_standard"]


def test_corruption_folders_without_severities_is_a_one_line_error(tmp_path):
    write_folder(tmp_path / "c" / "fog", {"cat": [0], "dog": [1]})  # classes directly under the corruption
    with pytest.raises(ValueError, match=r"no severity sub-folders.*<corruption>/<severity>/<class>") as err:
        R.evaluate_corruption_folders(TableModel(torch.eye(4)), tmp_path / "c", mean=ZERO, std=ONE,
                                      img_size=8, progress=False)
    assert str(tmp_path / "c") in str(err.value) and "fog" in str(err.value) and "\n" not in str(err.value)


def test_class_mapped_scores_every_mapped_class_even_without_images():
    # Only class "a" (-> training class 1) has images; "b" maps to training class 3, which the
    # model prefers over 1: restricted to the mapped classes {1, 3}, every prediction is 3: wrong.
    table = torch.tensor([[9.0, 1.0, 8.0, 2.0],
                          [9.0, 1.0, 8.0, 3.0]])
    kw = {"mean": ZERO, "std": ONE, "img_size": 8, "source_classes": ["a", "b"], "progress": False}
    res = S.evaluate_class_mapped(TableModel(table), (id_images([0, 1]), torch.tensor([0, 0])),
                                  {"a": "cat", "b": 3}, ["dog", "cat", "owl", "fox"], **kw)
    assert res["top1"] == 0.0 and res["n_classes_scored"] == 2 and res["top5"] == 1.0
    sub = table[:, [1, 3]].double()  # the reference: softmax over exactly the mapped classes
    assert math.isclose(res["nll"], float(nn.functional.cross_entropy(sub, torch.tensor([0, 0]))), rel_tol=1e-9)
