"""Instances: fields of one length, indexed together (numpy, torch and list fields alike)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from i3cl_core.structures import Instances


def _inst():
    return Instances(
        boxes=torch.arange(16, dtype=torch.float32).reshape(4, 4),
        lossweight=np.array([0.1, 0.2, 0.3, 0.4]),
        polygons=["p0", "p1", "p2", "p3"],
    )


def test_every_field_is_indexed_the_same_way():
    inst = _inst()
    for item in (
        torch.tensor([False, True, False, True]),
        np.array([False, True, False, True]),
        [1, 3],
        torch.tensor([1, 3]),
        slice(1, 4, 2),
    ):
        sub = inst[item]
        assert len(sub) == 2
        assert sub.polygons == ["p1", "p3"]
        assert sub.lossweight.tolist() == [0.2, 0.4]
        assert sub.boxes[:, 0].tolist() == [4.0, 12.0]
    one = inst[2]
    assert len(one) == 1 and one.polygons == ["p2"] and one.lossweight.tolist() == [0.3]
    assert inst[-1].polygons == ["p3"]
    empty = inst[torch.zeros(4, dtype=torch.bool)]
    assert len(empty) == 0 and empty.polygons == [] and empty.boxes.shape == (0, 4)


def test_a_field_of_another_length_is_refused():
    inst = _inst()
    with pytest.raises(ValueError, match="field 'labels' has 3 entries, the others 4"):
        inst.labels = torch.ones(3)
    with pytest.raises(AttributeError, match="no field 'scores'.*boxes, lossweight, polygons"):
        _ = inst.scores


def test_cat_joins_each_field_and_checks_the_names():
    a, b = _inst(), _inst()[[0]]
    c = Instances.cat([a, b])
    assert len(c) == 5 and c.polygons[-1] == "p0" and c.boxes.shape == (5, 4)
    assert c.lossweight.tolist() == [0.1, 0.2, 0.3, 0.4, 0.1]
    with pytest.raises(ValueError, match="fields differ"):
        Instances.cat([a, Instances(boxes=torch.zeros(1, 4))])


def test_instances_survive_pickling_as_dataloader_workers_send_them():
    import copy
    import pickle

    inst = _inst()
    for back in (pickle.loads(pickle.dumps(inst)), copy.deepcopy(inst), copy.copy(inst)):
        assert back.polygons == inst.polygons and torch.equal(back.boxes, inst.boxes)
        assert back.lossweight.tolist() == inst.lossweight.tolist()


def test_a_dataloader_with_worker_processes_delivers_targets(coco_factory):
    from conftest import rect
    from torch.utils.data import DataLoader

    from i3cl_core.data.coco import CocoTextDataset, collate

    imgs = [{"id": i, "file_name": f"gt_{i}.jpg", "width": 320, "height": 240} for i in (1, 2)]
    anns = [
        {
            "id": i,
            "image_id": i,
            "segmentation": [rect(10, 10, 60, 20)],
            "bbox": [10, 10, 60, 20],
            "iscrowd": 0,
            "lossweight": 0.5,
        }
        for i in (1, 2)
    ]
    ann, root = coco_factory(imgs, anns)
    loader = DataLoader(CocoTextDataset([(ann, root)]), batch_size=2, num_workers=1, collate_fn=collate)
    _, targets = next(iter(loader))
    assert [t["instances"].lossweight.tolist() for t in targets] == [[0.5], [0.5]]
    assert len(targets[0]["dontcare"]) == 0
