"""`aic train`: trains, checkpoints, resumes and exports a model a receiver can use."""

import json

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.neural.coder import ImageCoder, file_sha256  # noqa: E402
from shared.neural.export import export_model  # noqa: E402
from shared.neural.training import TrainConfig, train  # noqa: E402


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.clip(np.cumsum(rng.normal(0, 8, (128, 160, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
        with av.open(str(d / f"p{i}.png"), "w") as c:
            st = c.add_stream("png")
            st.width, st.height, st.pix_fmt = 160, 128, "rgb24"
            c.mux(st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(st.encode(None))
    return d


def test_train_checkpoints_resumes_and_exports_a_working_model(photos, tmp_path):
    cfg = TrainConfig(data=str(photos), steps=3, batch_size=2, crop=64, n=16, m=24)
    out = tmp_path / "run"
    ckpt = train(cfg, out, ckpt_every=2)
    assert torch.load(ckpt)["step"] == 3
    assert [line.split("\t")[0] for line in (out / "train_log.tsv").read_text().splitlines()] == ["2", "3"]

    resumed = train(TrainConfig(**{**cfg.__dict__, "steps": 5}), out, resume=ckpt, ckpt_every=2)
    assert torch.load(resumed)["step"] == 5
    times = [float(line.split("\t")[1]) for line in (out / "train_log.tsv").read_text().splitlines()]
    assert times == sorted(times)  # the clock continues across the resume

    model_dir = tmp_path / "models" / "mini"
    weights = export_model(resumed, model_dir, val=str(photos))
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["sha256"] == file_sha256(weights) and meta["steps"] == 5 and len(meta["rd"]) == len(cfg.lambdas)
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert meta["sha256"] in card and "| 7 |" in card
    coder = ImageCoder(weights)
    x = torch.rand(1, 3, 40, 70)
    streams, recon = coder.encode(x, 3)
    assert torch.equal(coder.decode(streams, 3, 40, 70), recon)
