"""Training settings that can be checked without data fail before the cluster starts (issue #21),
each with an error that says what to pass instead."""

from __future__ import annotations

import os

import pytest
import ray

from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store
from kneescreen.train.config import TrainConfig
from kneescreen.train.run import check_cluster, run_train


def _cfg(tmp_path, **kw) -> TrainConfig:
    data = tmp_path / "coll"
    (data / "normal").mkdir(parents=True, exist_ok=True)
    (data / "normal" / "a.dcm").write_bytes(b"x")
    return TrainConfig(**{"data": str(data), "out": str(tmp_path / "out"), "weights": "none", **kw})


@pytest.mark.parametrize("members, words", [
    (("nonet:gray",), "unknown architecture"),
    (("test_cnn:grey",), "gray or rgb"),
    (("test_cnn:gray:partly",), "finetune or frozen"),
    (("test_cnn:gray:frozen:crop",), "view must be one of"),
    (("test_cnn:gray:frozen:img:extra",), "at most architecture:input_mode:training:view"),
])
def test_member_strings_are_checked(tmp_path, members, words):
    with pytest.raises(KneescreenError, match=words):
        _cfg(tmp_path, members=members).validate()


def test_imagenet_weights_for_a_member_without_them_say_what_to_pass(tmp_path):
    with pytest.raises(KneescreenError, match="--weights none .* state dict"):
        _cfg(tmp_path, members=("test_cnn:gray",), weights="imagenet").validate()
    _cfg(tmp_path, members=("test_cnn:gray",), weights="none").validate()
    _cfg(tmp_path, members=("efficientnet_lite0:gray:frozen", "spectral_texture:gray:frozen:roi"),
         weights="imagenet").validate()  # offline weights, or none needed


def test_paths_are_checked_before_any_work(tmp_path):
    store = Store()
    _cfg(tmp_path).check_io(store)
    with pytest.raises(KneescreenError, match="--data .*nothing there"):
        _cfg(tmp_path, data=str(tmp_path / "missing")).check_io(store)
    with pytest.raises(KneescreenError, match="--weights .*no such file.*imagenet or none"):
        _cfg(tmp_path, weights=str(tmp_path / "w.pt")).check_io(store)
    with pytest.raises(KneescreenError, match="--split-dir .*no split.csv"):
        _cfg(tmp_path, split_dir=str(tmp_path / "nosplit")).check_io(store)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(KneescreenError, match="--out .*not writable"):
        _cfg(tmp_path, out=str(blocker / "out")).check_io(store)
    assert not os.path.exists(tmp_path / "out" / ".write-probe")


def test_s3_paths_are_checked(s3_server, tmp_path):
    store = Store(endpoint_url=s3_server)
    bucket = "checks"
    store.client.create_bucket(Bucket=bucket)
    store.write_bytes(f"s3://{bucket}/coll/normal/a.dcm", b"x")
    _cfg(tmp_path, data=f"s3://{bucket}/coll", out=f"s3://{bucket}/out").check_io(store)
    with pytest.raises(KneescreenError, match="--data"):
        _cfg(tmp_path, data=f"s3://{bucket}/nothing", out=f"s3://{bucket}/out").check_io(store)
    with pytest.raises(KneescreenError, match="--out .*not writable"):
        _cfg(tmp_path, out="s3://no-such-bucket-here/out").check_io(store)


def test_a_bad_member_fails_before_ray_starts(tmp_path):
    """`kneescreen train --members test_cnn:gray` with the default --weights imagenet: refused in
    `run_train` before a cluster is started or data is read."""
    started = ray.is_initialized()
    with pytest.raises(KneescreenError, match="--weights none"):
        run_train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "out"), members=("test_cnn:gray",)))
    assert ray.is_initialized() == started


def test_gpu_asked_for_on_a_cluster_without_one(ray_local):
    if ray.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this cluster has a GPU")
    with pytest.raises(KneescreenError, match="leave --use-gpu out"):
        check_cluster(TrainConfig(data="d", out="o", use_gpu=True))
    check_cluster(TrainConfig(data="d", out="o"))


def test_a_checkpoint_of_other_fits_is_refused_not_resumed():
    """A fine-tuned member's run resumes by name; under a reused name with other rows (another
    split, or another outer CV fold) its checkpoint would hand back models that saw this run's
    held-out rows. It is refused with what to do; the same fits resume where they were."""
    from kneescreen.train.loop import resumable

    config = {"member": "m", "run_dir": "/runs/x-m", "fits": [{"name": "final", "rows": "aa"},
                                                              {"name": "oof0", "rows": "bb"}]}
    same = {"fits": ["final:aa", "oof0:bb"], "fit": 1, "epoch": 3}
    assert resumable(same, config)["fit"] == 1
    for other in (["final:aa", "oof0:cc"], ["final:aa"], ["final:aa", "oof0:bb", "oof1:dd"]):
        with pytest.raises(ValueError, match="another --name"):
            resumable({**same, "fits": other}, config)
    assert resumable({"epoch": 3}, config)["fit"] == 0  # a checkpoint from before fits shared a run
