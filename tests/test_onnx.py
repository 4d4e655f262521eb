"""`python -m models.weights convert IN OUT.onnx --to onnx` (models/onnx_export.py): onnxruntime
is the witness, run here again on other batch and image sizes than the export's own check;
GRN's exported form equals the training one in fp32 and keeps fp16 sums finite; bad input is one
line, exit 2, nothing written."""
import copy
import shutil
import sys
import types

import onnx
import onnxruntime
import pytest
import timm
import torch

from models import create_fcmae, create_model
from models.convnextv2 import GRN
from models.onnx_export import ExportGRN, OnnxGraph
from models.weights import main
from tests.test_models import _randomise


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(values):
    return [d.dim_param or d.dim_value for d in values.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An atto classifier of 10 classes (non-trivial GRN and norms), saved as a training
    checkpoint and exported with the CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = _randomise(create_model("convnextv2_atto", num_classes=10)).eval()
    torch.save({"model": model.state_dict(), "epoch": 3}, folder / "cls.pth")
    main(["convert", str(folder / "cls.pth"), str(folder / "cls.onnx"), "--to", "onnx", "--input_size", "64"])
    return model, folder


def test_classifier_runs_in_onnxruntime_as_in_torch_at_any_batch_and_image_size(classifier, capsys):
    model, folder = classifier
    proto = onnx.load(str(folder / "cls.onnx"))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert _dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert _dims(proto.graph.output[0])[1:] == [10] and proto.graph.output[0].name == "logits"
    session = _session(folder / "cls.onnx")
    for n, h, w in ((3, 80, 80), (1, 128, 96), (2, 64, 160)):  # none of them the export's (1, 64), (2, 96)
        x = torch.randn(n, 3, h, w)
        with torch.no_grad():
            want = model(x)  # ConvNeXtV2.forward, GRN and pooling as trained
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_fcmae_encoder_exports_as_a_feature_extractor(tmp_path, capsys):
    """A FCMAE pretraining checkpoint (encoder, decoder, mask token): the file gives the encoder's
    last stage map, [N, 320, H/32, W/32], for any batch and image size."""
    torch.manual_seed(1)
    fcmae = _randomise(create_fcmae("convnextv2_atto"))
    torch.save({"model": fcmae.state_dict(), "epoch": 0}, tmp_path / "fcmae.pth")
    main(["convert", str(tmp_path / "fcmae.pth"), str(tmp_path / "enc.onnx"), "--to", "onnx", "--input_size", "64"])
    assert "output features [N, channels, H/32, W/32]" in capsys.readouterr().out
    session = _session(tmp_path / "enc.onnx")
    assert [o.name for o in session.get_outputs()] == ["features"]
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        want = OnnxGraph(fcmae.encoder.eval())(x)
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert got.shape == (2, 320, 3, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_exported_grn_is_the_trained_one_in_fp32_and_its_fp16_sums_stay_finite(classifier):
    """fp32: the exported form moves a whole model's logits by at most 1e-6. fp16 (what an fp16
    engine does with ReduceL2: squares summed in fp16): activations of a few hundred over a
    56 x 56 map overflow the plain sum of squares, never the scaled one (each square <= 1), and
    the exported GRN run in fp16 stays within fp16's precision of the fp32 result."""
    model, _ = classifier
    exported = copy.deepcopy(model)
    for block in (b for stage in exported.stages for b in stage):
        block.grn = ExportGRN(block.grn)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(OnnxGraph(exported)(x), model(x), rtol=0, atol=1e-6)

    grn = GRN(64)
    with torch.no_grad():
        grn.gamma.normal_(0, 0.5)
        grn.beta.normal_(0, 0.5)
    y = (torch.randn(2, 64, 56, 56) * 300).contiguous(memory_format=torch.channels_last)
    half = y.half()
    assert torch.isinf((half * half).sum(dim=(2, 3))).any()  # the plain norm's sum in fp16
    s = half.abs().amax(dim=(1, 2, 3), keepdim=True)
    scaled = ((half / s) * (half / s)).sum(dim=(2, 3))
    assert torch.isfinite(scaled).all() and scaled.max() <= 56 * 56
    with torch.no_grad():
        want = grn.forward_cf(y)
        got = ExportGRN(grn).half().forward_cf(half).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_bad_input_is_one_line_and_writes_nothing(classifier, tmp_path, capsys, monkeypatch):
    """A timm model that is not ConvNeXt V2 (no check we can stand behind), an OUT not .onnx, a
    check size below 64, onnxruntime missing, and a file whose outputs differ from torch's (here
    the exporter made to return another model's graph): one line, exit 2, no file left."""
    _, folder = classifier
    torch.save({"model": timm.create_model("resnet10t", num_classes=3).state_dict()}, tmp_path / "resnet.pth")
    torch.manual_seed(5)
    torch.save({"model": create_model("convnextv2_atto", num_classes=10).state_dict()}, tmp_path / "other.pth")
    before = sorted(p.name for p in tmp_path.iterdir())

    def refused(src, out, fragment, *extra):
        with pytest.raises(SystemExit) as info:
            main(["convert", str(tmp_path / src), str(tmp_path / out), "--to", "onnx", "--input_size", "64", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file, no temporary

    refused("resnet.pth", "r.onnx", "the ONNX export exports and checks ConvNeXt V2 only")
    refused("other.pth", "o.pt", "an ONNX file's name ends in .onnx")
    refused("other.pth", "o.onnx", "image_size 32 is below 64", "--input_size", "32")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)
        refused("other.pth", "o.onnx", "pip install onnx onnxscript onnxruntime")
    with monkeypatch.context() as m:
        wrong = types.SimpleNamespace(save=lambda path: shutil.copyfile(folder / "cls.onnx", path))
        m.setattr(torch.onnx, "export", lambda *a, **k: wrong)
        refused("other.pth", "o.onnx", "onnxruntime's logits (1, 10) differ from torch's (1, 10) by")
