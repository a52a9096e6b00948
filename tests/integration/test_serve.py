"""`samtune serve` driven by a client no one here wrote: 3D Slicer's MONAI Label module's own
`MONAILabelLib/client.py`, shipped in the monailabel 0.8.5 wheel (installed with --no-deps as a
test-only reference by .ci/setup and loaded by path; samtune never imports monailabel), against a
server started in the test on a free loopback port. Plus the security cases with plain requests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")

CLIENT = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"
TOKEN = "test-token-5f2a"
CLASSES = ["liver", "spleen", "kidney_right", "kidney_left"]
SHAPE = (96, 96, 10)  # phantom volumes: a few seconds per automatic inference with the tiny model


def slicer_client_module():
    if not CLIENT.is_file():
        pytest.skip(f"the 3D Slicer MONAI Label client is not installed ({CLIENT}); .ci/setup installs the monailabel wheel with --no-deps")
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(folder: Path, data_root: Path, task: str) -> Path:
    """An untrained checkpoint on tiny-pretrained (its decoder answers clicks on the phantom's organs)."""
    from samtune.adapters.lora import prepare_trainable
    from samtune.datasets.source import LabelSpace
    from samtune.finetune.checkpoints import save_checkpoint
    from samtune.finetune.recipe import dump_recipe, load_recipe
    from samtune.finetune.runtime import build_base_model, model_family

    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({
        "seed": 0, "task": task, "data": {"kind": "nifti", "root": str(data_root), "window_hu": [-160, 240], "val_fraction": 0.5},
        "model": {"name": "tiny-pretrained", "image_size": 128}, "train": {"steps": 2, "batch_size": 2, "eval_every": 2},
        "eval": {"batch_size": 8, "max_samples": 4}, "output": {"dir": str(folder / "unused")},
    }))  # fmt: skip
    recipe = load_recipe(folder / "recipe.yaml")
    family, base = model_family(recipe), build_base_model(recipe)
    tokens = 2 if task != "promptable" else 0
    if tokens:
        family.add_class_prompts(base, len(CLASSES), tokens)
    model = prepare_trainable(base, family, "lora", recipe.adapter.lora)
    space = LabelSpace([1, 2, 3, 4], CLASSES)
    save_checkpoint(model, folder / "best", dump_recipe(recipe), {"step": 0}, classes={"task": task, "tokens": tokens, "label_space": space.to_dict()})
    return folder / "best"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated CT phantom (5 cases) and two untrained checkpoints: both tasks, and promptable only."""
    from samtune.datasets.synthetic import generate_ct_phantom

    tmp = tmp_path_factory.mktemp("serve")
    data = generate_ct_phantom(tmp / "data", n_cases=5, shape=SHAPE)
    return {"tmp": tmp, "data": data, "both": _checkpoint(tmp / "both", data, "both"), "promptable": _checkpoint(tmp / "promptable", data, "promptable")}


class Server:
    def __init__(self, checkpoint: Path, studies: Path, token: str | None = TOKEN, max_upload_mb: int = 64):
        from samtune.finetune.serve.app import create_app
        from samtune.finetune.serve.server import ServeSettings, build_state

        self.state = build_state(ServeSettings(checkpoint, studies, token=token, device="cpu", max_upload_mb=max_upload_mb))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _studies(world, name: str) -> Path:
    studies = world["tmp"] / name
    (studies / "imagesTr").mkdir(parents=True)
    for f in sorted((world["data"] / "imagesTr").glob("*.nii.gz"))[:4]:
        shutil.copy(f, studies / "imagesTr" / f.name)
    return studies


def _logged_in(client_module, url: str):
    client = client_module.MONAILabelClient(url, tmpdir=_tmp())
    assert client.auth_enabled()
    client.update_auth(client.auth_token("radiologist", TOKEN))
    assert client.auth_valid_token()
    return client


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="slicer-client-")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _deep_voxel(mask: np.ndarray) -> list[int]:
    """The voxel of ``mask`` farthest from its border, on the slice where it is largest."""
    from scipy.ndimage import distance_transform_edt

    k = int(mask.sum((0, 1)).argmax())
    dist = distance_transform_edt(mask[:, :, k])
    i, j = np.unravel_index(int(dist.argmax()), dist.shape)
    return [int(i), int(j), k]


def test_slicer_client_drives_the_whole_loop(world):
    """info, session upload, auto, clicks, label upload, datastore, active learning, a tiny train run."""
    module = slicer_client_module()
    studies = _studies(world, "loop")
    with Server(world["both"], studies) as server:
        client = _logged_in(module, server.url)
        info = client.info()
        assert info["models"]["auto"]["type"] == "segmentation" and info["models"]["clicks"]["type"] == "deepgrow"
        assert info["models"]["clicks"]["dimension"] == 3 and info["labels"] == CLASSES
        assert set(info["strategies"]) == {"first", "random", "least_confident"} and "samtune" in info["trainers"]

        image = world["data"] / "imagesTr" / "phantom_004_0000.nii.gz"
        session = client.create_session(str(image))["session_id"]
        result, params = client.infer("auto", "phantom_004", {}, session_id=session)
        auto = nib.load(result)
        assert auto.shape == nib.load(str(image)).shape and np.allclose(auto.affine, nib.load(str(image)).affine)
        assert params["label_names"] == {n: i + 1 for i, n in enumerate(CLASSES)}
        assert set(np.unique(np.asarray(auto.dataobj))) <= {0, 1, 2, 3, 4}

        gt = np.asarray(nib.load(str(world["data"] / "labelsTr" / "phantom_004.nii.gz")).dataobj)
        click = _deep_voxel(gt == 1)
        result, params = client.infer("clicks", "phantom_004", {"label": "liver", "foreground": [click], "background": []}, session_id=session)
        answer = np.asarray(nib.load(result).dataobj)
        # binary, 1 = the clicked class (its class prompt here is untrained: where it lands is checked with the
        # promptable checkpoint in test_clicks_land_on_the_same_voxels_for_any_stored_orientation)
        assert set(np.unique(answer)) <= {0, 1} and answer.shape == gt.shape and params["label_names"] == {"liver": 1}

        label = world["data"] / "labelsTr" / "phantom_000.nii.gz"
        info_segments = [{"name": n, "idx": i + 1} for i, n in enumerate(CLASSES)]
        client.save_label("phantom_000", str(label), params={"label_info": info_segments})  # no tag: final
        client.save_label("phantom_001", str(world["data"] / "labelsTr" / "phantom_001.nii.gz"), params={"label_info": info_segments})
        objects = client.datastore()["objects"]
        assert list(objects["phantom_000"]["labels"]) == ["final"] and objects["phantom_002"]["labels"] == {}
        saved = np.asarray(nib.load(str(studies / "labelsTr" / "phantom_000.nii.gz")).dataobj)
        assert np.array_equal(saved, np.asarray(nib.load(str(label)).dataobj))
        downloaded = client.download_label("phantom_000", "final")
        assert np.array_equal(np.asarray(nib.load(downloaded).dataobj), saved)

        assert client.next_sample("first", {})["id"] == "phantom_002"
        sample = client.next_sample("least_confident", {})
        assert sample["id"] in ("phantom_002", "phantom_003") and sample["uncertainty"] >= 0

        started = client.train_start("samtune", {"steps": 2})
        assert started["status"] == "RUNNING" and started["labelled_images"] == 2
        deadline = time.time() + 240
        while client.train_status(check_if_running=True):
            assert time.time() < deadline, client.train_status()
            time.sleep(1)
        status = client.train_status()
        assert status["status"] == "SUCCESS", status["details"]
        run = studies / status["output"]
        assert (run / "checkpoints" / "last" / "adapter_config.json").is_file()
        assert "2 image(s) without a label left out" in (run / "train.log").read_text()


def _permuted_copy(src: Path, dst: Path) -> Path:
    """The same scan stored with its first two axes swapped and the (new) first one flipped: the
    world (RAS) position of every voxel is unchanged, its file indices are not."""
    image = nib.load(str(src))
    data = np.asarray(image.dataobj)
    permuted = np.flip(data.transpose(1, 0, 2), axis=0)
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # new (i, j) = old (j, i)
    flip = np.array([[-1, 0, 0, permuted.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    affine = image.affine @ np.linalg.inv(flip @ swap)
    nib.save(nib.Nifti1Image(permuted, affine), str(dst))
    return dst


def _to_permuted(ijk: list[int], shape: tuple[int, ...]) -> list[int]:
    i, j, k = ijk
    return [shape[1] - 1 - j, i, k]


def test_clicks_land_on_the_same_voxels_for_any_stored_orientation(world):
    """A foreground click adds the organ on its slice (the untrained LoRA leaves tiny-pretrained's
    click answer: the liver is found, smaller organs overflow), a background click removes it; the
    permuted/flipped copy of the scan gets the same answer on its own axes."""
    module = slicer_client_module()
    studies = _studies(world, "orient")
    image = world["data"] / "imagesTr" / "phantom_003_0000.nii.gz"
    _permuted_copy(image, studies / "imagesTr" / "turned_0000.nii.gz")
    shutil.copy(image, studies / "imagesTr" / "plain_0000.nii.gz")
    gt = np.asarray(nib.load(str(world["data"] / "labelsTr" / "phantom_003.nii.gz")).dataobj) == 1  # liver
    fg = _deep_voxel(gt)
    with Server(world["promptable"], studies) as server:
        client = _logged_in(module, server.url)
        assert "auto" not in client.info()["models"]  # no automatic mode: clicks alone
        plain, _ = client.infer("clicks", "plain", {"label": "liver", "foreground": [fg], "background": []})
        added = np.asarray(nib.load(plain).dataobj).astype(bool)
        assert added[tuple(fg)] and _dice(added[:, :, fg[2]], gt[:, :, fg[2]]) > 0.5
        turned, _ = client.infer("clicks", "turned", {"label": "liver", "foreground": [_to_permuted(fg, gt.shape)], "background": []})
        back = np.flip(np.asarray(nib.load(turned).dataobj).astype(bool), axis=0).transpose(1, 0, 2)
        assert np.array_equal(back, added)
        # a background click on the organ it just found takes it away there
        removed, _ = client.infer("clicks", "plain", {"label": "liver", "foreground": [], "background": [fg]})
        assert not np.asarray(nib.load(removed).dataobj)[tuple(fg)]


def _get(server, path, token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(server.url + path, headers=headers, timeout=60, **kw)


def test_security_cases_are_refused_cleanly_and_the_server_keeps_serving(world, tmp_path):
    studies = _studies(world, "security")
    outside = tmp_path / "secret_0000.nii.gz"
    shutil.copy(world["data"] / "imagesTr" / "phantom_000_0000.nii.gz", outside)
    (studies / "imagesTr" / "leak_0000.nii.gz").symlink_to(outside)
    with Server(world["both"], studies, max_upload_mb=1) as server:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.get(server.url + "/info/", timeout=10).status_code == 200  # open: the viewer reads it before logging in
        for path in ("/datastore/?output=all", "/datastore/image?image=phantom_000", "/train/"):
            assert _get(server, path, token=None).status_code == 401
            assert _get(server, path, token="wrong").status_code == 401
        assert requests.post(server.url + "/auth/token", data={"username": "x", "password": "wrong"}, timeout=10).status_code == 401
        for bad in ("../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "leak"):
            r = _get(server, f"/datastore/image?image={bad}")
            assert r.status_code in (400, 404) and "detail" in r.json(), (bad, r.text)
        assert "leak" not in _get(server, "/datastore/?output=all").json()["objects"]
        assert _get(server, "/session/..%2F..%2Fetc").status_code == 404
        assert _get(server, "/datastore/label?label=phantom_000&tag=../../x").status_code == 400

        files = {"file": ("junk.nii.gz", b"not a volume at all", "application/octet-stream")}
        r = requests.put(server.url + "/datastore/image?image=junk", files=files, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["field"] == "file"
        assert not list((studies / "imagesTr").glob("junk*")) and not list((studies / ".samtune" / "uploads").glob("*"))
        big = {"file": ("big.nii.gz", b"\0" * (3 << 20), "application/octet-stream")}
        assert requests.put(server.url + "/datastore/image?image=big", files=big, headers=auth, timeout=30).status_code == 413

        def infer(model, params, image="phantom_000"):
            return requests.post(f"{server.url}/infer/{model}?image={image}", data={"params": params}, headers=auth, timeout=60)

        r = infer("clicks", "{not json")
        assert r.status_code == 400 and r.json()["field"] == "params"
        r = infer("clicks", json.dumps({"label": "liver", "foreground": [[1, 2]]}))
        assert r.status_code == 400 and r.json()["field"] == "params.foreground"
        r = infer("clicks", json.dumps({"label": "liver", "foreground": [[500, 2, 3]]}))
        assert r.status_code == 400 and r.json()["field"] == "params.foreground[0]" and "/" not in r.json()["detail"].split("lies")[0][:3]
        r = infer("clicks", json.dumps({"label": "tumour", "foreground": [[5, 5, 5]]}))
        assert r.status_code == 400 and r.json()["field"] == "params.label"
        assert infer("nosuchmodel", "{}").status_code == 404
        assert infer("auto", "{}", image="../../etc/passwd").status_code == 400
        r = infer("auto", "{}", image="phantom_000")  # still serving after all of the above
        assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
        r = requests.post(f"{server.url}/infer/auto?image=phantom_000&output=image", data={"params": "{}"}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"  # the bare .nii.gz


def test_nrrd_answer_has_the_input_grid(world, tmp_path):
    import nrrd

    studies = _studies(world, "nrrd")
    with Server(world["both"], studies, token=None) as server:
        r = requests.post(f"{server.url}/infer/auto?image=phantom_000&output=image", data={"params": json.dumps({"result_extension": ".nrrd"})}, timeout=60)
        assert r.status_code == 200
        (tmp_path / "a.nrrd").write_bytes(r.content)
        data, header = nrrd.read(str(tmp_path / "a.nrrd"))
        image = nib.load(str(studies / "imagesTr" / "phantom_000_0000.nii.gz"))
        assert data.shape == image.shape and header["space"] == "right-anterior-superior"
        assert np.allclose(header["space directions"], image.affine[:3, :3].T) and np.allclose(header["space origin"], image.affine[:3, 3])
        # the volume sent with the request instead of an id: same answer as the stored image's
        with open(studies / "imagesTr" / "phantom_000_0000.nii.gz", "rb") as f:
            sent = requests.post(f"{server.url}/infer/auto?output=image", data={"params": json.dumps({"result_extension": ".nrrd"})},
                                 files={"file": ("scan.nii.gz", f)}, timeout=60)  # fmt: skip
        assert sent.status_code == 200 and np.array_equal(_nrrd_bytes(sent.content, tmp_path), data)
        assert not list((studies / ".samtune" / "sessions").glob("*.nii*")) and not list((studies / ".samtune" / "sessions").glob(".upload-*"))


def _nrrd_bytes(content: bytes, tmp_path: Path) -> np.ndarray:
    import nrrd

    (tmp_path / "b.nrrd").write_bytes(content)
    return nrrd.read(str(tmp_path / "b.nrrd"))[0]


def test_dicom_series_are_served_and_their_labels_become_dicom_seg_training_data(world, dicom_template):
    """A PACS export under studies/dicom/: the series are images (ids = SeriesInstanceUID, sent as
    NIfTI); a submitted label is written as a DICOM-SEG beside its series, which `data.kind: dicom`
    then reads as a training case."""
    from samtune.datasets.dicom_seg import read_seg
    from samtune.datasets.dicom_series import find_series, read_series
    from samtune.finetune.data import open_split
    from samtune.finetune.recipe import load_recipe

    module = slicer_client_module()
    studies = world["tmp"] / "dicom_studies"
    shutil.copytree(dicom_template, studies / "dicom")
    for patient in ("PHANTOM_001", "PHANTOM_002"):  # two patients still to be labelled
        shutil.rmtree(studies / "dicom" / patient / "SEG")
    with Server(world["both"], studies) as server:
        client = _logged_in(module, server.url)
        objects = client.datastore()["objects"]
        assert len(objects) == 3 and sum(bool(o["labels"]) for o in objects.values()) == 1  # PHANTOM_000 has its SEG
        uid = client.next_sample("first", {})["id"]
        image = nib.load(_download(server, uid))
        result, _ = client.infer("auto", uid, {})
        auto = nib.load(result)
        assert auto.shape == image.shape and np.allclose(auto.affine, image.affine)
        label = np.zeros(image.shape, np.uint8)
        label[10:20, 10:20, 3:6] = 2  # the reader's "spleen" segment, value 2 in the file
        path = Path(_tmp()) / "label.nii.gz"
        nib.save(nib.Nifti1Image(label, image.affine), str(path))
        client.save_label(uid, str(path), params={"label_info": [{"name": "spleen", "idx": 2}]})
        segs = list((studies / "dicom").rglob("samtune_seg/*.seg.dcm"))
        assert [s.name for s in segs] == [f"{uid}.seg.dcm"]
        assert client.datastore()["objects"][uid]["labels"] and client.next_sample("first", {})["id"] != uid
    series = next(s for s in find_series(studies / "dicom")[0] if s.uid == uid)
    values, classes = read_seg(segs[0], read_series(series).sources)
    spleen = next(c.value for c in classes if c.name == "spleen")
    assert np.array_equal(values == spleen, label == 2)  # the reader's voxels, on the series' own grid
    recipe = world["tmp"] / "dicom_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"kind": "dicom", "root": str(studies / "dicom"), "val_fraction": 0.5},
                                      "model": {"name": "tiny", "image_size": 64}, "output": {"dir": str(world["tmp"] / "dicom_run")}}))  # fmt: skip
    split = open_split(load_recipe(recipe))  # PHANTOM_000 (its PACS SEG) and the one just labelled; one left out
    assert len(split.train) > 0 and len(split.val) > 0 and not split.skipped, split.skipped
    assert sum("no DICOM-SEG references it" in n for n in split.notes) == 1, split.notes


def _download(server, image_id: str) -> str:
    r = requests.get(f"{server.url}/datastore/image?image={image_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200
    path = Path(_tmp()) / f"{image_id}.nii.gz"
    path.write_bytes(r.content)
    return str(path)
