"""ONNX export of our ConvNeXt V2 (`python -m models.weights convert IN OUT.onnx --to onnx`),
checked by onnxruntime before anything is written.

The file takes `image` [N, in_chans, H, W] (normalised as in training; N, H and W dynamic, opset
OPSET) and gives, by what the weights hold:
- a classifier (a head): `logits` [N, classes];
- the final norm but no head (num_classes 0): `features` [N, dims[-1]], pooled and normalised;
- a FCMAE encoder (neither): `features` [N, dims[-1], H/32, W/32], the last stage's map.

The check: onnxruntime on the CPU against torch (models/convnextv2.py, as trained) on random
images, batch 1 at `image_size` and batch 2 at `image_size` + 32; a largest absolute difference
above MAX_DIFF refuses the file (its temporary is removed: nothing is written).

GRN in fp16 (ConvNeXt-V2 issue 66): GRN's norm ||x|| over H x W squares the activations and sums
them; an engine that keeps that sum in fp16 (largest value 65504: 3136 positions of 5.0 at
stage 0 of a 224-pixel image reach it) overflows, and inf / inf is NaN. The exported GRN
(`ExportGRN`) divides x by its per-image largest magnitude first, so the squares are <= 1 and
their sum <= H x W; the ratio Nx it feeds is the same (fp32 results move by ~1e-7).
"""
import torch
from torch import nn

from models.atomic import atomic_file
from models.errors import ModelError

OPSET = 18          # torch.onnx's exporter's own (>= 17, where LayerNormalization is one node)
MAX_DIFF = 1e-4     # largest |onnxruntime - torch| accepted, in the outputs' units
MAX_BYTES = 2 * 10 ** 9  # a single ONNX file (protobuf) holds under 2 GiB: weights plus the graph
SCALE_FLOOR = 1e-4  # ExportGRN's divisor at least this (a normal fp16 number): an all-zero map gives 0, not 0/0


class ExportGRN(nn.Module):
    """models/convnextv2.GRN as the ONNX file computes it, safe in fp16 (the module docstring):
    out = x * (1 + gamma * Nx) + beta, Nx = ||x / s|| / (mean_C ||x / s|| + eps / s), s the
    largest |x| of the image, which equals the training GRN's ||x|| / (mean_C ||x|| + eps).
    Swapped in only on the model built for the export: training keeps GRN (its fused two-pass
    backward; the extra max pass would cost it time for nothing in fp32 or bf16)."""

    def __init__(self, grn):
        super().__init__()
        self.gamma, self.beta, self.eps = grn.gamma, grn.beta, grn.eps

    def forward_cf(self, x):  # what Block's dense path calls: x [N, C, H, W]
        s = x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(SCALE_FLOOR)
        gx = torch.linalg.vector_norm(x / s, 2, dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
        nx = gx / (gx.mean(dim=1, keepdim=True) + self.eps / s)
        return x * (1 + self.gamma.reshape(1, -1, 1, 1) * nx) + self.beta.reshape(1, -1, 1, 1)


class OnnxGraph(nn.Module):
    """What the ONNX file computes with `model`'s weights (see the module docstring). Pools with
    a mean rather than ConvNeXtV2.forward's avg_pool2d, whose kernel is the input's size: the
    export would fix it to the traced size."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        for down, stage in zip(m.downsample_layers, m.stages):
            x = stage(down(x))
        if m.norm is None:  # a FCMAE encoder: the last stage's map
            return x
        return m.head(m.norm(x.mean((2, 3))))


def export_onnx(ours, dst, image_size=224):
    """Export `ours` (models.weights.Ours: checked ConvNeXt V2 weights) to `dst` (.onnx), then
    run the file with onnxruntime against torch; write it only when they agree within MAX_DIFF.
    Returns the line telling what the file takes and gives."""
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter builds the file with onnx and onnxscript)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ModelError(f"exporting to ONNX needs the packages onnx, onnxscript and onnxruntime ({e}); "
                         "pip install onnx onnxscript onnxruntime") from None
    from models.convnextv2 import VARIANTS, ConvNeXtV2
    if not str(dst).endswith(".onnx"):
        raise ModelError(f"{dst}: an ONNX file's name ends in .onnx; give OUT.onnx")
    if image_size < 64:  # torch.export takes a last stage of 1 x 1 for a fixed size
        raise ModelError(f"image_size {image_size} is below 64; the export is traced and checked at 64 "
                         "pixels or more (the file then takes any size)")
    nbytes = sum(v.numel() * 4 for v in ours.state_dict.values())
    if nbytes > MAX_BYTES:
        raise ModelError(f"{ours.name}'s weights take {nbytes / 1e9:.1f} GB in fp32, more than one ONNX file "
                         f"holds (2 GB); export a smaller variant")
    sd, (depths, dims) = ours.state_dict, VARIANTS[ours.name]
    if ours.num_classes and "norm.weight" not in sd:
        raise ModelError("the checkpoint has a classifier head but no final norm (norm.weight); pass a "
                         "whole classifier, or a FCMAE encoder (neither)")
    model = ConvNeXtV2(in_chans=ours.in_chans, num_classes=ours.num_classes, depths=depths, dims=dims,
                       with_head="norm.weight" in sd)
    model.load_state_dict(sd)
    graph = OnnxGraph(model).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(n, ours.in_chans, size, size, generator=gen)
              for n, size in ((1, image_size), (2, image_size + 32))]
    with torch.no_grad():
        expected = [graph(x) for x in images]  # torch as trained, before GRN is swapped
        for block in (b for stage in model.stages for b in stage):
            block.grn = ExportGRN(block.grn)
        output = "logits" if ours.num_classes else "features"
        dim = torch.export.Dim
        # traced on batch 2: torch.export fixes a dimension it sees as 1
        program = torch.onnx.export(graph, (images[1],), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["image"], output_names=[output],
                                    dynamic_shapes={"x": {0: dim("batch"), 2: dim("height", min=64),
                                                          3: dim("width", min=64)}})
    worst = 0.0
    with atomic_file(dst) as f:  # the file is checked where it will be; refused, the temporary goes
        program.save(f.name)
        session = onnxruntime.InferenceSession(f.name, providers=["CPUExecutionProvider"])
        for x, want in zip(images, expected):
            got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
            diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
            if not diff <= MAX_DIFF:  # NaN too
                raise ModelError(f"onnxruntime's {output} {tuple(got.shape)} differ from torch's "
                                 f"{tuple(want.shape)} by {diff:.2e} (more than {MAX_DIFF}) at batch {x.shape[0]}, "
                                 f"{x.shape[-1]} px; nothing written: try another torch or onnxruntime version")
            worst = max(worst, diff)
    shape = "[N, classes]" if ours.num_classes else "[N, channels]" if model.norm is not None else \
        "[N, channels, H/32, W/32] (the encoder's last stage)"
    return (f"onnxruntime matches torch within {worst:.1e} (batch 1 and 2, {image_size} and {image_size + 32} "
            f"px); input image [N, {ours.in_chans}, H, W] normalised as in training, output {output} {shape}; "
            "fp16 runtimes: GRN's norm is computed on x / max|x| (fp16-safe)")
